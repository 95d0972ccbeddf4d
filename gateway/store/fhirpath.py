"""Compile the FHIRPath expressions of search-parameter definitions into fast extractors.

Search parameters (https://hl7.org/fhir/R4/searchparameter.html) use a small subset of
FHIRPath: paths, unions, `as`/`.as()`, `.where(resolve() is T)` and `.where(x='y')`.
Those compile to plain dict walks; anything else falls back to fhirpathpy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fhirpathpy
from fhirpathpy.models import models as fhirpath_models

Extractor = Callable[[dict[str, Any]], list["Value"]]


@dataclass(frozen=True)
class Value:
    """A value found by an expression; `fhir_type` is known when a choice type was cast."""

    value: Any
    fhir_type: str | None = None


# The data types a choice element `value[x]` may take, as they end its JSON name: only
# these make `valueQuantity` an answer to `value` (and not `statusReason` to `status`).
CHOICE_SUFFIXES = frozenset({
    "Base64Binary", "Boolean", "Canonical", "Code", "Date", "DateTime", "Decimal", "Id",
    "Instant", "Integer", "Markdown", "Oid", "PositiveInt", "String", "Time", "UnsignedInt",
    "Uri", "Url", "Uuid", "Address", "Age", "Annotation", "Attachment", "CodeableConcept",
    "Coding", "ContactPoint", "Count", "Distance", "Duration", "HumanName", "Identifier",
    "Money", "Period", "Quantity", "Range", "Ratio", "Reference", "SampledData", "Signature",
    "Timing", "ContactDetail", "Contributor", "DataRequirement", "Expression",
    "ParameterDefinition", "RelatedArtifact", "TriggerDefinition", "UsageContext", "Dosage",
    "Meta",
})

_AS_PAREN = re.compile(r"^\((?P<path>[\w.]+) as (?P<type>\w+)\)(?P<rest>(\.\w+)*)$")
_AS_CALL = re.compile(r"^(?P<path>[\w.]+)\.as\((?P<type>\w+)\)(?P<rest>(\.\w+)*)$")
_WHERE_RESOLVE = re.compile(r"^(?P<path>[\w.]+)\.where\(resolve\(\) is (?P<type>\w+)\)$")
_WHERE_EQ = re.compile(
    r"^(?P<path>[\w.]+)\.where\((?P<field>\w+) ?= ?'(?P<lit>[^']*)'\)(?P<rest>(\.\w+)*)$")
_PLAIN = re.compile(r"^[\w.]+$")


def split_union(expression: str) -> list[str]:
    """Split at top-level `|` (outside parentheses and quotes)."""
    parts, depth, quote, start = [], 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'":
            quote = not quote
        elif not quote and ch in "()":
            depth += 1 if ch == "(" else -1
        elif not quote and ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def _children(node: Any, name: str, cast: str | None = None) -> list[Any]:
    """`node.name` in FHIR JSON: lists flatten; choice elements resolve (value → valueX)."""
    if not isinstance(node, dict):
        return []
    if cast is not None:
        found = node.get(name + cast[0].upper() + cast[1:])
    elif name in node:
        found = node[name]
    else:
        found = next((v for k, v in node.items()
                      if k.startswith(name) and k[len(name):] in CHOICE_SUFFIXES), None)
    if found is None:
        return []
    return found if isinstance(found, list) else [found]


def _walk(nodes: list[Any], steps: list[str]) -> list[Any]:
    for step in steps:
        nodes = [child for node in nodes for child in _children(node, step)]
    return nodes


def _steps(path: str) -> list[str]:
    """Drop the leading resource type: `Task.for.reference` → ['for', 'reference']."""
    return path.split(".")[1:]


def _compile_part(part: str) -> Extractor | None:
    if _PLAIN.match(part):
        steps = _steps(part)
        return lambda r: [Value(v) for v in _walk([r], steps)]
    if m := (_AS_PAREN.match(part) or _AS_CALL.match(part)):
        *head, last = _steps(m["path"])
        cast, rest = m["type"], [s for s in m["rest"].split(".") if s]

        def extract_cast(r: dict[str, Any]) -> list[Value]:
            hits = [c for n in _walk([r], head) for c in _children(n, last, cast)]
            return [Value(v, None if rest else cast) for v in _walk(hits, rest)]
        return extract_cast
    if m := _WHERE_RESOLVE.match(part):
        steps, target = _steps(m["path"]), m["type"]

        def extract_typed_ref(r: dict[str, Any]) -> list[Value]:
            return [Value(v) for v in _walk([r], steps) if _reference_type(v) == target]
        return extract_typed_ref
    if m := _WHERE_EQ.match(part):
        steps, field, lit = _steps(m["path"]), m["field"], m["lit"]
        rest = [s for s in m["rest"].split(".") if s]

        def extract_where(r: dict[str, Any]) -> list[Value]:
            hits = [v for v in _walk([r], steps) if isinstance(v, dict) and v.get(field) == lit]
            return [Value(v) for v in _walk(hits, rest)]
        return extract_where
    return None


def _reference_type(value: Any) -> str | None:
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str):
        return value.get("type") if isinstance(value, dict) else None
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else None


def _fallback(expression: str) -> Extractor:
    compiled = fhirpathpy.compile(expression, model=fhirpath_models["r4"])

    def extract(r: dict[str, Any]) -> list[Value]:
        try:
            return [Value(v) for v in compiled(r, {})]
        except Exception:  # noqa: BLE001 - a definition we cannot evaluate indexes nothing
            return []
    return extract


def roots(expression: str) -> frozenset[str] | None:
    """The top-level elements an expression starts from (`Task.for.reference` → {'for'}),
    or None when it is one we do not compile (it could start anywhere)."""
    found = set()
    for part in split_union(expression):
        m = (_AS_PAREN.match(part) or _AS_CALL.match(part) or _WHERE_RESOLVE.match(part)
             or _WHERE_EQ.match(part))
        path = m["path"] if m else part if _PLAIN.match(part) else None
        steps = _steps(path) if path else []
        if not steps:
            return None
        found.add(steps[0])
    return frozenset(found)


def compile_expression(expression: str) -> Extractor:
    """An extractor for a whole (possibly union) expression."""
    parts = split_union(expression)
    compiled = [_compile_part(p) for p in parts]
    if any(c is None for c in compiled):
        return _fallback(expression)
    extractors: list[Extractor] = [c for c in compiled if c is not None]
    if len(extractors) == 1:
        return extractors[0]
    return lambda r: [v for e in extractors for v in e(r)]
