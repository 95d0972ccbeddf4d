"""`_summary` and `_elements`: return part of each resource, marked SUBSETTED.

https://hl7.org/fhir/R4/search.html#summary and #elements
"""

from __future__ import annotations

from typing import Any

from gateway.fhir import element_sets

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
             "code": "SUBSETTED", "display": "subsetted"}
ALWAYS = frozenset({"resourceType", "id", "meta"})


def _keep(resource: dict[str, Any], allowed: frozenset[str] | set[str]) -> dict[str, Any]:
    return {k: v for k, v in resource.items()
            if k in allowed or (k.startswith("_") and k[1:] in allowed)}


def _mark(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    resource["meta"] = meta
    return resource


def shape(resource: dict[str, Any], summary: str | None, elements: list[str]) -> dict[str, Any]:
    summary_set, mandatory = element_sets(resource["resourceType"])
    if summary == "true":
        return _mark(_keep(resource, ALWAYS | summary_set | mandatory))
    if summary == "text":
        return _mark(_keep(resource, ALWAYS | {"text"} | mandatory))
    if summary == "data":
        return _mark({k: v for k, v in resource.items() if k != "text"})
    if elements:
        wanted = {e.split(".")[0] for e in elements}
        return _mark(_keep(resource, ALWAYS | mandatory | wanted))
    return resource
