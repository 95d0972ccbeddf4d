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
        error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = InvalidError(str(exc.detail))
        error.status = exc.status_code
    return outcome_response(error)


async def on_validation_error(request: Request, exc: Exception) -> Response:
    return outcome_response(InvalidError("Malformed request"))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    request_id = getattr(request.state, "request_id", "-")
    log.exception("unhandled error", extra={"request_id": request_id})
    return outcome_response(UnexpectedError(
        f"Internal error; quote correlation id {request_id} to the operators"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(FhirError, on_fhir_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
