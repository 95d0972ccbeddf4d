"""Which SMART scope right a FHIR request needs, checked for every request and every
Bundle entry (they are dispatched alike) when the caller came with a token; and the
records nobody may change.

Rights are create, read, update, delete, search (`system/Type.cruds`); a request needs
them from both the token's scopes and the client's role (gateway/auth/policies.py).
Which instances exist for a partner is gateway/services/visibility.py's."""

from __future__ import annotations

from typing import NoReturn
from urllib.parse import parse_qsl

from gateway.auth.policies import role_allows, sees_everything
from gateway.auth.tokens import Grant
from gateway.errors import ForbiddenError, Issue, MethodNotAllowedError
from gateway.services.context import FhirRequest

IMMUTABLE = frozenset({"Provenance", "AuditEvent"})
"""Records of who did what: created, never changed or deleted, by anyone (21 CFR Part 11
§11.10(e), EU GMP Annex 11 §9)."""

_READ_ONLY = {"AuditEvent": "GET, HEAD"}  # written by the server alone (gateway/audit)
_BY_METHOD = {"GET": "r", "POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}


def needed(request: FhirRequest) -> tuple[str, str] | None:
    """(resource type or "*", right) the request needs; None when it needs none (the
    CapabilityStatement, and a Bundle, whose entries are checked one by one)."""
    parts = [p for p in request.path.strip("/").split("/") if p]
    method = request.method
    if not parts:
        return None if method == "POST" else ("*", "s")
    head, rest = parts[0], parts[1:]
    if head == "metadata":
        return None
    if head in ("_history", "_search"):
        return "*", "s"
    if head.startswith("$"):
        return "*", "r"
    if not rest:
        return head, "s" if method == "GET" else _BY_METHOD.get(method, "r")
    if rest[0] in ("_search", "_history") and len(rest) == 1:
        return head, "s"
    if rest[0].startswith("$"):
        return head, "r"
    if len(rest) > 1:  # Type/id/_history[/vid], Type/id/$op
        return head, "r"
    return head, _BY_METHOD.get(method, "r")


def check_immutable(request: FhirRequest) -> None:
    """Refuse (405) changing or deleting a Provenance or AuditEvent, whoever asks."""
    if request.method not in ("PUT", "PATCH", "DELETE"):
        return
    resource_type = request.path.strip("/").split("/", 1)[0]
    if resource_type in IMMUTABLE:
        raise MethodNotAllowedError(
            f"{resource_type} is a record of what happened: it is created once and never "
            "changed or deleted",
            headers={"Allow": _READ_ONLY.get(resource_type, "GET, HEAD, POST")})


def authorize(grant: Grant | None, request: FhirRequest) -> None:
    """Refuse (403) what the token's scopes do not cover; no grant means an internal
    caller (the orchestrator) or a server run with ATM_AUTH=off."""
    if grant is None:
        return
    need = needed(request)
    if need is None:
        return
    resource_type, right = need
    scopes, role = grant.scope_list, grant.client.role
    if not any(scope.covers(resource_type, right) for scope in scopes):
        _refuse(grant, _what(resource_type, right))
    if not role_allows(role, resource_type, right) or (
            resource_type == "*" and not sees_everything(role)):
        _refuse_role(role, _what(resource_type, right))
    if right == "s" and _reaches_other_types(request) and not (
            any(scope.covers("*", "r") for scope in scopes) and sees_everything(role)):
        # Included or joined resources would escape the per-partner rules of their own
        # type: only roles that see everything, with read on every type, may use them.
        _refuse(grant, "_include, _revinclude, chained parameters or _has (they need "
                       "system/*.r and a role that sees every resource)")


def _what(resource_type: str, right: str) -> str:
    return f"{_RIGHTS[right]} on {'any type' if resource_type == '*' else resource_type}"


def check_may_create(grant: Grant | None, resource_type: str) -> None:
    """An update that turned out to create (a PUT to a new id) needs the create right
    too; raised inside the write's transaction, it undoes it."""
    if grant is None:
        return
    what = f"create on {resource_type} (this PUT would create it)"
    if not any(scope.covers(resource_type, "c") for scope in grant.scope_list):
        _refuse(grant, what)
    if not role_allows(grant.client.role, resource_type, "c"):
        _refuse_role(grant.client.role, what)


def _reaches_other_types(request: FhirRequest) -> bool:
    pairs = list(request.query)
    media = (request.content_type or "").split(";")[0].strip().lower()
    if request.body and media == "application/x-www-form-urlencoded":
        pairs += parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True)
    return any(name.split(":")[0] in ("_include", "_revinclude", "_has") or "." in name
               for name, _ in pairs)


def _refuse_role(role: str, what: str) -> NoReturn:
    message = f"A {role} client may not {what}"
    raise ForbiddenError(message, issues=[Issue("forbidden", message)])


def _refuse(grant: Grant, what: str) -> NoReturn:
    message = f"This client's scopes ({grant.scopes}) do not allow {what}"
    raise ForbiddenError(message, issues=[Issue("forbidden", message)])


_RIGHTS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
