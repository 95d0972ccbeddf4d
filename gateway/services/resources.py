"""Reading a resource out of a request body, and validating it, once."""

from __future__ import annotations

from typing import Any

from gateway import fhir, jsonio
from gateway.errors import InvalidError, Issue, NotFoundError, UnsupportedMediaTypeError
from gateway.services.context import FhirRequest

FHIR_JSON = ("application/fhir+json", "application/json", "application/json+fhir")
ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")


def check_type(resource_type: str) -> None:
    if not fhir.is_resource_type(resource_type):
        raise NotFoundError(f"Unknown resource type '{resource_type}'")


def is_id(resource_id: str) -> bool:
    return 0 < len(resource_id) <= 64 and set(resource_id) <= ID_CHARS


def check_id(resource_id: str) -> None:
    if not is_id(resource_id):
        raise InvalidError(f"{ascii(resource_id[:80])} is not a valid id: 1-64 of A-Z a-z "
                           "0-9 - .")


def check_known_id(resource_type: str, resource_id: str) -> None:
    """A read of an id no resource can have is a 404 without asking the database."""
    if not is_id(resource_id):
        raise NotFoundError(f"{resource_type}/{ascii(resource_id[:80])} is not known: "
                            "not a valid id")


def body_json(request: FhirRequest) -> Any:
    """The request body as JSON (already parsed for Bundle entries)."""
    if request.resource is not None:
        return request.resource
    if not request.body:
        raise InvalidError("The request has no body")
    media = (request.content_type or "application/fhir+json").split(";")[0].strip().lower()
    if media not in FHIR_JSON:
        raise UnsupportedMediaTypeError(
            f"Content-Type {media} is not supported: send application/fhir+json")
    return jsonio.loads(request.body)


def valid_resource(data: Any, resource_type: str | None, resource_id: str | None = None,
                   ) -> dict[str, Any]:
    """Check the body is a valid resource of the URL's type (and id); raise InvalidError."""
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        missing = isinstance(data, dict) and "resourceType" not in data
        raise _invalid("The body must be a JSON object with a resourceType", "resourceType",
                       "required" if missing else "structure")
    if resource_type is not None and data["resourceType"] != resource_type:
        raise _invalid(f"The body is a {data['resourceType']} but the URL is for "
                       f"{resource_type}", "resourceType")
    if resource_id is not None:
        if "id" not in data:
            raise _invalid(f"The body has no id: an update must carry the id '{resource_id}'",
                           f"{resource_type}.id", "required")
        if data["id"] != resource_id:
            raise _invalid(f"The body's id '{str(data['id'])[:80]}' differs from "
                           f"'{resource_id}', the id this request updates", f"{resource_type}.id")
    issues = fhir.validate(data)
    if issues:
        raise InvalidError(f"Invalid {data['resourceType']}: {issues[0].diagnostics}",
                           issues=issues)
    return data


def _invalid(diagnostics: str, expression: str, code: str = "invalid") -> InvalidError:
    return InvalidError(diagnostics, issues=[Issue(code, diagnostics, expression=(expression,))])
