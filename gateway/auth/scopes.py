"""SMART system scopes (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html):
v2 `system/Task.rs`, `system/*.cruds`, and v1 `system/Task.read|write|*` read as v2."""

from __future__ import annotations

import re
from dataclasses import dataclass

INTERACTIONS = "cruds"  # create, read, update, delete, search: the v2 order
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"^system/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)$")


class ScopeError(ValueError):
    """A scope string this server does not understand."""


@dataclass(frozen=True, order=True)
class Scope:
    resource_type: str  # "*" for every type
    interactions: str  # a subset of "cruds", in that order

    def __str__(self) -> str:
        return f"system/{self.resource_type}.{self.interactions}"

    def covers(self, resource_type: str, interaction: str) -> bool:
        return self.resource_type in ("*", resource_type) and interaction in self.interactions


def parse_scope(text: str) -> Scope:
    match = _SCOPE.match(text)
    if match is None:
        raise ScopeError(f"{text!r} is not a system scope (system/Type.cruds)")
    resource_type, rights = match.groups()
    if rights in _V1:
        return Scope(resource_type, _V1[rights])
    if not rights or any(c not in INTERACTIONS for c in rights) or len(set(rights)) != len(
            rights) or "".join(sorted(rights, key=INTERACTIONS.index)) != rights:
        raise ScopeError(f"{text!r}: the rights are some of c, r, u, d, s, in that order")
    return Scope(resource_type, rights)


def parse_scopes(text: str) -> list[Scope]:
    """A space-separated scope list; unknown scopes raise ScopeError."""
    return [parse_scope(part) for part in text.split()]


def narrow(requested: list[Scope], allowed: list[Scope]) -> list[Scope]:
    """What a token may carry: each requested scope cut down to what the client's
    registration allows (never wider), empty ones dropped."""
    granted: dict[str, set[str]] = {}
    for want in requested:
        for may in allowed:
            if may.resource_type not in ("*", want.resource_type) and want.resource_type != "*":
                continue
            kind = want.resource_type if may.resource_type == "*" else may.resource_type
            rights = set(want.interactions) & set(may.interactions)
            if rights:
                granted.setdefault(kind, set()).update(rights)
    return sorted(Scope(kind, "".join(c for c in INTERACTIONS if c in rights))
                  for kind, rights in granted.items())


def render(scopes: list[Scope]) -> str:
    return " ".join(map(str, scopes))
