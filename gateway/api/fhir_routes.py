"""The FHIR REST surface under /fhir as the OpenAPI document describes it.

Requests are served by gateway.api.fhir_app (a plain ASGI endpoint in front of FastAPI's
routing); these routes exist to document that surface, path by path, in /openapi.json.
Their endpoint is that same ASGI endpoint's handler, so a route reached directly would
behave identically."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

from gateway.api.fhir_app import respond

router = APIRouter(prefix="/fhir")

_TYPE = {"name": "type", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "A FHIR R4 resource type, e.g. Task"}
_ID = {"name": "id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}}
_VID = {"name": "vid", "in": "path", "required": True, "schema": {"type": "string"}}
_RESOURCE_BODY = {"required": True, "content": {"application/fhir+json": {
    "schema": {"$ref": "#/components/schemas/Resource"}}}}
_PATCH_BODY = {"required": True, "content": {"application/json-patch+json": {
    "schema": {"type": "array", "items": {"type": "object"}}}}}
_FORM_BODY = {"content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}}
_HEADERS = {
    "If-Match": "Update only if the current version has this ETag (W/\"n\"); else 412",
    "If-None-Exist": "Conditional create: search criteria, e.g. identifier=urn:x|1",
    "If-None-Match": "Read: 304 when the current version has this ETag",
    "If-Modified-Since": "Read: 304 when not modified since this HTTP date",
    "Prefer": "return=minimal|representation|OperationOutcome, handling=strict|lenient",
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"description": "An OperationOutcome describing the error",
                "content": {"application/fhir+json": {
                    "schema": {"$ref": "#/components/schemas/Resource"}}}},
}


def _route(path: str, methods: list[str], summary: str, *, params: list[dict[str, Any]],
           body: dict[str, Any] | None = None, headers: tuple[str, ...] = ()) -> None:
    parameters = [*params, *({"name": h, "in": "header", "required": False,
                              "schema": {"type": "string"}, "description": _HEADERS[h]}
                             for h in headers)]
    extra: dict[str, Any] = {"parameters": parameters}
    if body:
        extra["requestBody"] = body
    for method in methods:
        router.add_api_route(
            path, respond, methods=[method], summary=f"{summary}" if len(methods) == 1
            else f"{summary} ({method})", operation_id=f"{method.lower()}_{_op_name(path)}",
            openapi_extra=extra, responses=_RESPONSES, response_class=Response,
            include_in_schema=True)


def _op_name(path: str) -> str:
    cleaned = path.strip("/").replace("{", "").replace("}", "").replace("$", "op_")
    return cleaned.replace("/", "_").replace(".", "_") or "base"


def register(app: FastAPI) -> None:
    # include_router copies the routes into each app: filling the shared router once keeps
    # them from piling up (and repeating in the OpenAPI document) with every create_app().
    if not router.routes:
        _add_routes()
    app.include_router(router)


def _add_routes() -> None:
    no_params: list[dict[str, Any]] = []
    _route("/metadata", ["GET"], "CapabilityStatement", params=no_params)
    _route("", ["POST"], "batch or transaction Bundle", params=no_params,
           body=_RESOURCE_BODY, headers=("Prefer",))
    _route("", ["GET"], "search-system (_id, _lastUpdated)", params=no_params)
    _route("/_history", ["GET"], "history-system", params=no_params)
    _route("/_search", ["POST"], "search-system by form", params=no_params, body=_FORM_BODY)
    _route("/{type}", ["GET"], "search-type", params=[_TYPE], headers=("Prefer",))
    _route("/{type}", ["POST"], "create (If-None-Exist: conditional create)", params=[_TYPE],
           body=_RESOURCE_BODY, headers=("If-None-Exist", "Prefer"))
    _route("/{type}", ["PUT"], "conditional update", params=[_TYPE], body=_RESOURCE_BODY,
           headers=("If-Match", "Prefer"))
    _route("/{type}", ["PATCH"], "conditional patch (JSON Patch)", params=[_TYPE],
           body=_PATCH_BODY, headers=("If-Match", "Prefer"))
    _route("/{type}", ["DELETE"], "conditional delete (single match)", params=[_TYPE])
    _route("/{type}/_search", ["POST"], "search-type by form", params=[_TYPE], body=_FORM_BODY)
    _route("/{type}/_history", ["GET"], "history-type", params=[_TYPE])
    _route("/{type}/$validate", ["POST"], "$validate", params=[_TYPE], body=_RESOURCE_BODY)
    _route("/AuditEvent/$verify-chain", ["GET"], "check the audit trail's hash chain "
           "(a Parameters: intact, checked, pending, brokenAt)", params=no_params)
    _route("/{type}/{id}", ["GET"], "read", params=[_TYPE, _ID],
           headers=("If-None-Match", "If-Modified-Since"))
    _route("/{type}/{id}", ["PUT"], "update (creates with the client's id)",
           params=[_TYPE, _ID], body=_RESOURCE_BODY, headers=("If-Match", "Prefer"))
    _route("/{type}/{id}", ["PATCH"], "patch (JSON Patch)", params=[_TYPE, _ID],
           body=_PATCH_BODY, headers=("If-Match", "Prefer"))
    _route("/{type}/{id}", ["DELETE"], "delete", params=[_TYPE, _ID], headers=("If-Match",))
    _route("/{type}/{id}/_history", ["GET"], "history-instance", params=[_TYPE, _ID])
    _route("/{type}/{id}/_history/{vid}", ["GET"], "vread", params=[_TYPE, _ID, _VID])
    _route("/{type}/{id}/$validate", ["POST"], "$validate an instance", params=[_TYPE, _ID],
           body=_RESOURCE_BODY)
    _route("/{type}/{id}/$custody-report", ["GET"], "chain of identity and custody of a "
           "CarePlan, BiologicallyDerivedProduct or Specimen (a Bundle; _format=html or "
           "Accept: text/html for the printable document)", params=[_TYPE, _ID])
    _route("/Provenance/{id}/$verify-signatures", ["GET"], "verify a custody record's "
           "signatures against the versions they cover (a Parameters)", params=[_ID])
    _route("/CarePlan/$find-chain", ["GET", "POST"], "ranked slot chains for a protocol "
           "(protocol, patient, start, end, priority, count, organization; a Parameters)",
           params=no_params)
    _route("/CarePlan/{id}/$find-chain", ["GET", "POST"], "ranked slot chains for an "
           "enrolment (start, end, priority, count; a Parameters with each chain, or the "
           "reasons there are none)", params=[_ID])
    _route("/CarePlan/{id}/$hold-chain", ["POST"], "hold a chain's slots for some minutes "
           "(a chain or slots, minutes)", params=[_ID], body=_RESOURCE_BODY)
    _route("/CarePlan/{id}/$book-chain", ["POST"], "book a chain in one transaction (a "
           "hold, a chain, slots, or steps without a published slot with a reason); 409 "
           "with fresh chains when a slot was taken", params=[_ID], body=_RESOURCE_BODY)
    _route("/CarePlan/{id}/$cancel-chain", ["POST"], "cancel the booked chain (reason)",
           params=[_ID], body=_RESOURCE_BODY)
    _route("/Appointment/{id}/$reschedule", ["POST"], "move one appointment of a chain "
           "(slot, or service+start+end+reason; apply=true to make the moves) and propose "
           "or make the moves downstream", params=[_ID], body=_RESOURCE_BODY)
