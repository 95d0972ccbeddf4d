"""Helpers shared by the search tests: store resources under known ids, run searches."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

FHIR = {"Content-Type": "application/fhir+json"}


def put(client: TestClient, body: dict[str, Any], resource_id: str) -> dict[str, Any]:
    """Create `body` as `resource_id` (PUT create-on-update) and return what was stored."""
    response = client.put(f"/fhir/{body['resourceType']}/{resource_id}",
                          json={**body, "id": resource_id}, headers=FHIR)
    assert response.status_code == 201, response.text
    return dict(response.json())


def search(client: TestClient, url: str) -> dict[str, Any]:
    """The searchset Bundle of a search that must succeed."""
    response = client.get(url)
    assert response.status_code == 200, response.text
    return dict(response.json())
