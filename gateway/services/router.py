"""Dispatch a FhirRequest to its interaction, by method and path shape.

https://hl7.org/fhir/R4/http.html#summary lists the shapes. The HTTP layer and the
batch/transaction processor both come through here.
"""

from __future__ import annotations

from typing import NoReturn
from urllib.parse import parse_qsl

from sqlalchemy.exc import DBAPIError

from gateway.custody import handoffs
from gateway.errors import ConflictError, InvalidError, MethodNotAllowedError, NotFoundError
from gateway.services import (
    access,
    audit_events,
    bundle,
    capability,
    crud,
    history,
    operations,
    search,
)
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.resources import check_type
from gateway.store.database import is_transient


def _allow(method: str, allowed: str) -> None:
    if method not in allowed.split():
        _not_allowed(method, allowed)


def _not_allowed(method: str, allowed: str) -> NoReturn:
    listed = ", ".join(sorted(allowed.split()))
    raise MethodNotAllowedError(f"{method} is not allowed here (allowed: {listed})",
                                headers={"Allow": listed})


def _form_query(request: FhirRequest) -> list[tuple[str, str]]:
    """POST _search: parameters from the form body and the URL together."""
    media = (request.content_type or "").split(";")[0].strip().lower()
    if request.body and media != "application/x-www-form-urlencoded":
        raise InvalidError("POST _search takes application/x-www-form-urlencoded parameters")
    try:
        body = (request.body or b"").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidError("Form body is not valid UTF-8") from exc
    return [*request.query, *parse_qsl(body, keep_blank_values=True)]


def handle(ctx: Context, request: FhirRequest) -> FhirResponse:
    """One client request. Losing a PostgreSQL deadlock stored nothing: the client is told
    to retry (409). Inside a transaction Bundle, entries go to `dispatch`, so the Bundle
    can replay itself instead."""
    try:
        return dispatch(ctx, request)
    except handoffs.StepStoppedError as exc:
        handoffs.record_stop(ctx, exc)  # the step's hold and alerts outlive the refusal
        raise
    except DBAPIError as exc:
        if not is_transient(exc):
            raise
        raise ConflictError("A concurrent request changed the same resources; nothing was "
                            "stored. Retry.", headers={"Retry-After": "1"}) from exc


def dispatch(ctx: Context, request: FhirRequest) -> FhirResponse:
    access.authorize(ctx.grant, request)
    access.check_immutable(request)
    parts = [p for p in request.path.strip("/").split("/") if p]
    method = request.method
    if not parts:
        _allow(method, "GET POST")
        if method == "POST":
            return bundle.process(ctx, request)
        return search.search(ctx, request, None)
    head = parts[0]
    if head == "metadata" and len(parts) == 1:
        _allow(method, "GET")
        return capability.capability_response(ctx, request)
    if head == "_history" and len(parts) == 1:
        _allow(method, "GET")
        return history.history(ctx, request)
    if head == "_search" and len(parts) == 1:
        _allow(method, "POST")
        return search.search(ctx, request, None, _form_query(request))
    if head.startswith("$"):
        return operations.system_operation(ctx, request, head[1:])
    check_type(head)
    return _type_level(ctx, request, head, parts[1:])


def _type_level(ctx: Context, request: FhirRequest, resource_type: str,
                rest: list[str]) -> FhirResponse:
    if resource_type == "AuditEvent":  # the server's audit trail, not the resource store
        return audit_events.handle(ctx, request, rest, _form_query)
    method = request.method
    if not rest:
        if method == "GET":
            return search.search(ctx, request, resource_type)
        if method == "POST":
            return crud.create(ctx, request, resource_type)
        if method == "PUT":
            return crud.conditional_update(ctx, request, resource_type)
        if method == "PATCH":
            return crud.patch(ctx, request, resource_type, None)
        if method == "DELETE":
            return crud.conditional_delete(ctx, request, resource_type)
        _not_allowed(method, "GET POST PUT PATCH DELETE")
    first = rest[0]
    if first == "_search" and len(rest) == 1:
        _allow(method, "POST")
        return search.search(ctx, request, resource_type, _form_query(request))
    if first == "_history" and len(rest) == 1:
        _allow(method, "GET")
        return history.history(ctx, request, resource_type)
    if first.startswith("$") and len(rest) == 1:
        return operations.type_operation(ctx, request, resource_type, first[1:])
    return _instance_level(ctx, request, resource_type, first, rest[1:])


def _instance_level(ctx: Context, request: FhirRequest, resource_type: str, resource_id: str,
                    rest: list[str]) -> FhirResponse:
    method = request.method
    if not rest:
        if method == "GET":
            return crud.read(ctx, request, resource_type, resource_id)
        if method == "PUT":
            return crud.update(ctx, request, resource_type, resource_id)
        if method == "PATCH":
            return crud.patch(ctx, request, resource_type, resource_id)
        if method == "DELETE":
            return crud.delete(ctx, request, resource_type, resource_id)
        _not_allowed(method, "GET PUT PATCH DELETE")
    if rest[0] == "_history":
        _allow(method, "GET")
        if len(rest) == 1:
            return history.history(ctx, request, resource_type, resource_id)
        if len(rest) == 2:
            return crud.vread(ctx, request, resource_type, resource_id, rest[1])
    if rest[0].startswith("$") and len(rest) == 1:
        return operations.instance_operation(ctx, request, resource_type, resource_id,
                                             rest[0][1:])
    raise NotFoundError(f"No interaction at {request.path}")
