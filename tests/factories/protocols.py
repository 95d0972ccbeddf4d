"""Protocols in their FHIR form (orchestration/PROTOCOLS.md), built in a line or two."""

from __future__ import annotations

from typing import Any

from orchestration.protocol import ESCALATION_ROLE, ON_FAILURE, ROLE_SYSTEM

URL = "https://example.org/fhir/PlanDefinition/test-therapy"
DAYS = {"system": "http://unitsofmeasure.org", "code": "d", "unit": "d"}


def action(stage_id: str, *after: str | tuple[str, int], role: str | None = None,
           deadline_days: int | None = None, when: str | None = None,
           back_to: tuple[str, int] | None = None, steps: list[dict[str, Any]] | None = None,
           ends_before: tuple[str, int] | None = None) -> dict[str, Any]:
    """A PlanDefinition action in the form orchestration/PROTOCOLS.md gives."""
    related = [{"actionId": a, "relationship": "after-end"} if isinstance(a, str) else
               {"actionId": a[0], "relationship": "after-end",
                "offsetDuration": {"value": a[1], **DAYS}} for a in after]
    if ends_before:
        related.append({"actionId": ends_before[0], "relationship": "before-start",
                        "offsetDuration": {"value": ends_before[1], **DAYS}})
    result: dict[str, Any] = {"id": stage_id, "title": stage_id.title()}
    if related:
        result["relatedAction"] = related
    if role:
        result["participant"] = [{"type": "practitioner",
                                  "role": {"coding": [{"system": ROLE_SYSTEM, "code": role}]}}]
    if deadline_days:
        result["timingDuration"] = {"value": deadline_days, **DAYS}
    if when:
        result["condition"] = [{"kind": "applicability",
                                "expression": {"language": "text/fhirpath", "expression": when}}]
    if back_to:
        result["extension"] = [{"url": ON_FAILURE, "extension": [
            {"url": "back-to", "valueId": back_to[0]},
            {"url": "max-repeats", "valueUnsignedInt": back_to[1]}]}]
    if steps:
        result["action"] = steps
    return result


def plan_definition(*actions: dict[str, Any], escalation: str | None = None,
                    plan_id: str = "test-therapy") -> dict[str, Any]:
    plan: dict[str, Any] = {"resourceType": "PlanDefinition", "id": plan_id,
                            "url": URL.replace("test-therapy", plan_id), "version": "1",
                            "status": "active", "title": "Test therapy",
                            "action": list(actions)}
    if escalation:
        plan["extension"] = [{"url": ESCALATION_ROLE, "valueCode": escalation}]
    return plan
