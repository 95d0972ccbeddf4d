"""Shaping FHIR responses: ETag, Last-Modified, Location and `Prefer: return=`."""

from __future__ import annotations

from typing import Any

from gateway import jsonio
from gateway.errors import Issue, operation_outcome
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.store.repository import Version
from gateway.store.timeparse import format_http_date


def version_headers(ctx: Context, version: Version, location: bool = False) -> dict[str, str]:
    headers = {"ETag": version.etag, "Last-Modified": format_http_date(version.last_updated)}
    if location:
        headers["Location"] = ctx.url(version.resource_type, version.id, "_history",
                                      str(version.version))
    return headers


def outcome_bytes(diagnostics: str, severity: str = "information",
                  code: str = "informational") -> bytes:
    return jsonio.dumps(operation_outcome([Issue(code, diagnostics, severity=severity)]))


def prefer_return(request: FhirRequest) -> str:
    for part in (request.header("prefer") or "").split(";"):
        for item in part.split(","):
            key, _, value = item.strip().partition("=")
            if key == "return":
                return value.strip('"')
    return "representation"


def written(ctx: Context, request: FhirRequest, version: Version, status: int,
            message: str) -> FhirResponse:
    """The answer to a create/update/patch, honouring Prefer: return=…"""
    headers = version_headers(ctx, version, location=True)
    mode = prefer_return(request)
    if mode == "minimal":
        return FhirResponse(status, None, headers)
    if mode == "OperationOutcome":
        return FhirResponse(status, outcome_bytes(message), headers)
    return FhirResponse(status, version.content, headers)


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> FhirResponse:
    return FhirResponse(status, jsonio.dumps(data), headers or {})
