"""Turn a resource into search-index rows, one table per search-parameter type.

What each type indexes follows https://hl7.org/fhir/R4/search.html: strings are matched
case- and accent-insensitively, dates as ranges at their precision, tokens as
system|code, references as type/id (and the reference's identifier for `:identifier`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from decimal import Decimal
from functools import cache
from typing import Any

from gateway.fhir import element_names
from gateway.store.fhirpath import Value
from gateway.store.search_params import SearchParam, indexed_params
from gateway.store.timeparse import date_range

MAX_TOKEN = 255
MAX_URI = 1020

Row = dict[str, Any]


def normalize(text: str) -> str:
    """Lower-case without accents: how `name=eve` finds "Ève"."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()[:MAX_TOKEN]


def _cut(value: Any, limit: int = MAX_TOKEN) -> str | None:
    return None if value is None else str(value)[:limit]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName, Address and other complex types
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city",
                    "district", "state", "postalCode", "country", "display", "value"):
            item = value.get(key)
            for s in item if isinstance(item, list) else [item]:
                if isinstance(s, str):
                    yield s


def _tokens(value: Any) -> Iterator[tuple[str | None, str | None, str | None]]:
    """(system, code, text) triples of a code, Coding, CodeableConcept, Identifier…"""
    if isinstance(value, bool):
        yield None, "true" if value else "false", None
    elif isinstance(value, str | int | Decimal):
        yield None, str(value), None
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "code" not in value and "value" not in value):
            for coding in value.get("coding", []):
                yield coding.get("system"), coding.get("code"), coding.get("display")
            if value.get("text"):
                yield None, None, value["text"]
        elif "code" in value:
            yield value.get("system"), value.get("code"), value.get("display")
        elif "value" in value:  # Identifier, ContactPoint
            yield value.get("system"), value.get("value"), (value.get("type") or {}).get("text")


def _references(value: Any) -> Iterator[tuple[str | None, str | None, str | None]]:
    """(target type, target id, url) of a Reference, canonical or uri."""
    ref = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(ref, str):
        if isinstance(value, dict) and value:  # identifier or display only: present, so
            yield None, None, None             # `:missing=true` must not match it
        return
    path = ref.split("|")[0].split("/_history/")[0]
    parts = path.rstrip("/").split("/")
    if len(parts) >= 2 and not ref.startswith(("urn:", "#")):
        absolute = "://" in ref
        yield parts[-2], parts[-1], path if absolute else None
    else:
        yield None, None, ref


def references_in(values: list[Value]) -> Iterator[tuple[str, str]]:
    """(type, id) of the local references among extracted values (absolute URLs and
    contained references left out)."""
    for v in values:
        for target_type, target_id, url in _references(v.value):
            if target_type and target_id and url is None:
                yield target_type, target_id


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    return float(value)


def _string_rows(values: list[Value]) -> Iterator[Row]:
    for v in values:
        for s in _strings(v.value):
            yield {"value": normalize(s), "exact": s}


def _token_rows(values: list[Value]) -> Iterator[Row]:
    for v in values:
        for system, code, text in _tokens(v.value):
            yield {"system": _cut(system), "code": _cut(code),
                   "text": normalize(text) if text else None}


def _reference_rows(values: list[Value]) -> Iterator[Row]:
    for v in values:
        for target_type, target_id, url in _references(v.value):
            yield {"target_type": _cut(target_type), "target_id": _cut(target_id), "url": url}


def _date_rows(values: list[Value]) -> Iterator[Row]:
    for v in values:
        span = _date_span(v.value)
        if span is not None:
            yield {"low": span[0], "high": span[1]}


def _date_span(value: Any) -> tuple[int, int] | None:
    if isinstance(value, str):
        return date_range(value)
    if isinstance(value, dict):
        if "start" in value or "end" in value:  # Period: open ends are unbounded
            start = date_range(value["start"]) if "start" in value else None
            end = date_range(value["end"]) if "end" in value else None
            return ((start[0] if start else -(2**62)), (end[1] if end else 2**62))
        spans = (date_range(e) for e in value.get("event", []) if isinstance(e, str))
        events = [e for e in spans if e is not None]
        if events:  # Timing: from the first to the last event
            return min(e[0] for e in events), max(e[1] for e in events)
    return None


def _number_rows(values: list[Value]) -> Iterator[Row]:
    for v in values:
        n = _number(v.value)
        if n is not None:
            yield {"value": n}


def _quantity_rows(values: list[Value]) -> Iterator[Row]:
    for v in values:
        q = v.value
        if isinstance(q, dict) and _number(q.get("value")) is not None:
            yield {"value": _number(q["value"]), "system": _cut(q.get("system")),
                   "code": _cut(q.get("code") or q.get("unit"))}


def _uri_rows(values: list[Value]) -> Iterator[Row]:
    for v in values:
        if isinstance(v.value, str):
            yield {"value": v.value[:MAX_URI]}


_BUILDERS = {
    "string": _string_rows, "token": _token_rows, "reference": _reference_rows,
    "date": _date_rows, "number": _number_rows, "quantity": _quantity_rows, "uri": _uri_rows,
}


@cache
def _index_plan(resource_type: str) -> tuple[tuple[SearchParam, frozenset[str] | None], ...]:
    """A type's indexed parameters, each with the top-level elements it starts from when
    it can be skipped by looking at those alone: most of a type's ~25 parameters are
    absent from any one resource, and a set test is cheaper than a walk. A choice element
    such as value[x] is not among the type's element names (its JSON name varies), so a
    parameter starting from one is never skipped."""
    names = element_names(resource_type)
    return tuple((param, param.roots if param.roots is not None and param.roots <= names
                  else None) for param in indexed_params(resource_type))


def index_rows(resource: dict[str, Any]) -> dict[str, list[Row]]:
    """Rows per index table ('token', 'date'…) for a resource, without the key columns."""
    out: dict[str, list[Row]] = {t: [] for t in _BUILDERS}
    present = resource.keys()
    for param, roots in _index_plan(resource["resourceType"]):
        if roots is not None and roots.isdisjoint(present):
            continue
        values = param.extract(resource)
        if not values:
            continue
        rows = out[param.type]
        seen = set()
        for row in _BUILDERS[param.type](values):
            key = tuple(row.values())
            if key not in seen:
                seen.add(key)
                row["param"] = param.code
                rows.append(row)
        if param.type == "reference":  # Reference.identifier answers `param:identifier`
            for v in values:
                ident = v.value.get("identifier") if isinstance(v.value, dict) else None
                for system, code, _ in _tokens(ident):
                    out["token"].append({"param": f"{param.code}:identifier",
                                         "system": _cut(system), "code": _cut(code),
                                         "text": None})
    return out
