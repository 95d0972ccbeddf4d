"""An operation's parameters, whether they came in a GET's query or a POST's Parameters.

https://hl7.org/fhir/R4/operations.html#request: simple parameters may be given in the
URL; a POST carries a Parameters resource.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.errors import InvalidError, MethodNotAllowedError
from gateway.services.context import FhirRequest
from gateway.services.resources import body_json


def arguments(request: FhirRequest) -> list[dict[str, Any]]:
    """The operation's parameters: a GET's query as strings, or a POST's Parameters."""
    if request.method == "GET":
        return [{"name": k, "valueString": v} for k, v in request.query
                if not k.startswith("_")]
    if request.method != "POST":
        raise MethodNotAllowedError("Invoke this operation with GET or POST",
                                    headers={"Allow": "GET, POST"})
    if not request.body and request.resource is None:
        return [{"name": k, "valueString": v} for k, v in request.query]
    data = body_json(request)
    if not isinstance(data, dict) or data.get("resourceType") != "Parameters":
        raise InvalidError("The body of this operation is a Parameters resource")
    parameters = data.get("parameter", [])
    if not isinstance(parameters, list) or not all(isinstance(p, dict) for p in parameters):
        raise InvalidError("Parameters.parameter must be a list of parameters")
    return parameters


def value(part: dict[str, Any] | None) -> Any:
    if part is None:
        return None
    return next((v for k, v in part.items() if k.startswith("value")), None)


def named(parts: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [p for p in parts if p.get("name") == name]


def text(parts: list[dict[str, Any]], name: str) -> str | None:
    found = named(parts, name)
    if len(found) > 1:
        raise InvalidError(f"Parameter {name} is given more than once")
    given = value(found[0]) if found else None
    if isinstance(given, dict):  # a Reference
        given = given.get("reference")
    if given is not None and not isinstance(given, str | int | bool):
        raise InvalidError(f"Parameter {name} has a value of the wrong type")
    return None if given is None else str(given)


def instant(parts: list[dict[str, Any]], name: str) -> datetime | None:
    given = text(parts, name)
    if given is None:
        return None
    try:
        found = datetime.fromisoformat(given.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidError(f"Parameter {name} must be a date or dateTime, not {given!r}") from exc
    return found if found.tzinfo else found.replace(tzinfo=UTC)


def number(parts: list[dict[str, Any]], name: str, default: int, high: int) -> int:
    given = text(parts, name)
    if given is None:
        return default
    if not given.isdigit() or not 1 <= int(given) <= high:
        raise InvalidError(f"Parameter {name} must be a whole number from 1 to {high}")
    return int(given)
