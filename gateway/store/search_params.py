"""The registry of search parameters: the R4 definitions table, compiled once per type."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from gateway.fhir import definitions
from gateway.store.fhirpath import Extractor, compile_expression, roots

# Resource-level parameters answered from the resources table itself, not the index.
TABLE_PARAMS = frozenset({"_id", "_lastUpdated"})


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str
    expression: str
    targets: tuple[str, ...]
    extract: Extractor
    roots: frozenset[str] | None = None
    """The top-level elements the expression starts from (None: could be any)."""


def _param(code: str, row: dict) -> SearchParam:
    return SearchParam(code, row["type"], row["expression"], tuple(row.get("target", ())),
                       compile_expression(row["expression"]), roots(row["expression"]))


@cache
def params_for(resource_type: str) -> dict[str, SearchParam]:
    """Every search parameter a resource type supports, `_tag`, `_profile`… included."""
    table = definitions()["params"]
    rows = {**table.get("Resource", {}), **table.get(resource_type, {})}
    return {code: _param(code, row) for code, row in sorted(rows.items())}


@cache
def indexed_params(resource_type: str) -> tuple[SearchParam, ...]:
    return tuple(p for p in params_for(resource_type).values() if p.code not in TABLE_PARAMS)
