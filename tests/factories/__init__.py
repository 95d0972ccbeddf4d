"""Valid resources with overrides: `task(status="ready", owner=ref("Organization/1"))`."""

from __future__ import annotations

from typing import Any


def ref(reference: str) -> dict[str, str]:
    return {"reference": reference}


def task(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Task", "status": "ready", "intent": "order",
                            "code": {"coding": [{"system": "http://example.org/atm-step",
                                                 "code": "apheresis"}]}}
    body.update(overrides)
    return body


def patient(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Patient", "active": True,
                            "name": [{"family": "Durand", "given": ["Élodie"]}],
                            "birthDate": "1980-04-12"}
    body.update(overrides)
    return body


def organization(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Organization", "name": "Apheresis Centre North"}
    body.update(overrides)
    return body


def identifier(system: str, value: str) -> list[dict[str, str]]:
    return [{"system": system, "value": value}]
