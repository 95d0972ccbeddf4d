"""Every error leaves as an OperationOutcome with the status its error class carries.

Unknown exceptions become a generic 500 with a correlation id: the cause is logged,
never sent to the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gateway import jsonio
from gateway.api.http import FHIR_JSON_UTF8
from gateway.errors import (
    FhirError,
    InvalidError,
    MethodNotAllowedError,
    NotFoundError,
    UnexpectedError,
)

log = logging.getLogger("gateway.errors")


def outcome_response(error: FhirError) -> Response:
    return Response(jsonio.dumps(error.outcome()), error.status, error.headers,
                    media_type=FHIR_JSON_UTF8)


async def on_fhir_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    return outcome_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    error: FhirError
    if exc.status_code == 404:
        error = NotFoundError(f"No route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        allowed = ", ".join(_allowed_methods(request, exc))
        error = MethodNotAllowedError(
            f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})",
            headers={"Allow": allowed})
    else:
        error = InvalidError(str(exc.detail))
        error.status = exc.status_code
    return outcome_response(error)


def _allowed_methods(request: Request, exc: StarletteHTTPException) -> list[str]:
    """Every method some route takes at this path: each FHIR route serves one method, so
    Starlette's own Allow header names only the first route it tried."""
    methods = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
    scope = {**request.scope, "method": "GET"}
    routes = list(request.app.router.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # FastAPI's include_router
        if included is not None:
            routes.extend(included.routes)
        elif getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    methods.discard("HEAD")
    return sorted(methods)


async def on_validation_error(request: Request, exc: Exception) -> Response:
    return outcome_response(InvalidError("Malformed request"))


def unexpected_response(request: Request) -> Response:
    """Log the exception being handled; the client gets only an id to quote."""
    request_id = getattr(request.state, "request_id", "-")
    log.exception("unhandled error", extra={"request_id": request_id})
    return outcome_response(UnexpectedError(
        f"Internal error; quote correlation id {request_id} to the operators"))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    return unexpected_response(request)


def install(app: FastAPI) -> None:
    app.add_exception_handler(FhirError, on_fhir_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
