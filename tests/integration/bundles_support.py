"""Builders and probes shared by the batch/transaction Bundle tests."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from gateway.store.database import Database
from gateway.store.schema import metadata

FHIR = {"Content-Type": "application/fhir+json"}
BASE = "http://testserver/fhir"


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return bundle("transaction", *entries)


def batch(*entries: dict[str, Any]) -> dict[str, Any]:
    return bundle("batch", *entries)


def entry(method: str, url: str, resource: Any = None, full_url: str | None = None,
          **request: str) -> dict[str, Any]:
    """One Bundle.entry; extra keywords go to entry.request (ifMatch, ifNoneExist…)."""
    out: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if full_url is not None:
        out["fullUrl"] = full_url
    if resource is not None:
        out["resource"] = resource
    return out


def patch_binary(operations: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON Patch wrapped as Bundle entries carry it (https://hl7.org/fhir/R4/http.html#patch)."""
    data = base64.b64encode(json.dumps(operations).encode()).decode()
    return {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": data}


def post_bundle(client: TestClient, body: Any, prefer: str | None = None) -> httpx.Response:
    headers = dict(FHIR)
    if prefer:
        headers["Prefer"] = prefer
    return client.post("/fhir", json=body, headers=headers)


def create(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR)
    assert response.status_code == 201, response.text
    return dict(response.json())


def read(client: TestClient, reference: str) -> httpx.Response:
    return client.get(f"/fhir/{reference}")


def ids_of(client: TestClient, query: str) -> list[str]:
    """Ids of the current resources a search finds (one page is enough for these tests)."""
    response = client.get(f"/fhir/{query}")
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in response.json().get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"]


def location_id(location: str) -> str:
    """The id in a Location such as http://host/fhir/Task/<id>/_history/1."""
    return location.split("/_history/")[0].rsplit("/", 1)[-1]


def row_counts(db: Database) -> dict[str, int]:
    """Rows in every store table: the footprint a rolled-back transaction must not leave.
    The audit trail is left out: it records the failed attempt itself."""
    with db.read() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in metadata.sorted_tables if not t.name.startswith("audit_")}


def outcome(status_code: int, response: httpx.Response) -> list[dict[str, Any]]:
    """The issues of an error response, after checking it is an OperationOutcome."""
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return list(body["issue"])
