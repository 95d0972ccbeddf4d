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


def assert_outcome(response: Any, status: int, code: str, diagnostics: str = "",
                   expression: str | None = None) -> dict[str, Any]:
    """Check an error answer: status, FHIR media type, and an OperationOutcome whose first
    issue has this code, diagnostics containing `diagnostics`, and the FHIRPath given."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    assert issue["code"] == code, body
    if status >= 400:
        assert issue["severity"] in ("error", "fatal"), body
    assert diagnostics in issue.get("diagnostics", ""), body
    if expression is not None:
        assert expression in issue.get("expression", []), body
    return body
