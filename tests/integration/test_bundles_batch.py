"""Batch Bundles: every entry stands alone (https://hl7.org/fhir/R4/http.html#batch)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.factories import patient, task
from tests.integration.bundles_support import (
    batch,
    create,
    entry,
    location_id,
    patch_binary,
    post_bundle,
    read,
)


def test_batch_failing_entries_get_their_own_outcome_while_others_persist(
        client: TestClient) -> None:
    donor = create(client, patient())
    doomed, patched = create(client, task()), create(client, task())
    invalid = {k: v for k, v in task().items() if k != "status"}
    response = post_bundle(client, batch(
        entry("POST", "Patient", patient(name=[{"family": "Batchelor"}])),
        entry("POST", "Task", invalid),
        entry("GET", "Patient/unknown"),
        entry("PUT", f"Patient/{donor['id']}", {**patient(), "id": donor["id"]}, ifMatch='W/"9"'),
        entry("DELETE", f"Task/{doomed['id']}"),
        entry("PATCH", f"Task/{patched['id']}", patch_binary(
            [{"op": "replace", "path": "/status", "value": "completed"}])),
        {"fullUrl": "urn:uuid:no-request"},
    ))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "batch-response"
    entries = body["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "201 Created", "400 Bad Request", "404 Not Found", "412 Precondition Failed",
        "200 OK", "200 OK", "400 Bad Request"]
    assert entries[1]["response"]["outcome"]["issue"] == [{
        "severity": "error", "code": "invalid",
        "diagnostics": "Value for the field 'status' is required.",
        "expression": ["Task.status"]}]
    assert entries[2]["response"]["outcome"]["issue"] == [{
        "severity": "error", "code": "not-found", "diagnostics": "Patient/unknown is not known"}]
    assert entries[3]["response"]["outcome"]["issue"] == [{
        "severity": "error", "code": "conflict",
        "diagnostics": f"Version 9 is not the current version of Patient/{donor['id']} "
                       "(it is 1)"}]
    assert entries[6]["response"]["outcome"]["issue"] == [{
        "severity": "error", "code": "required", "diagnostics": "Bundle.entry[6] has no request",
        "expression": ["Bundle.entry[6].request"]}]
    for failed in entries[1:4] + entries[6:]:
        assert "resource" not in failed
    created_id = location_id(entries[0]["response"]["location"])
    assert read(client, f"Patient/{created_id}").json() == entries[0]["resource"]
    assert read(client, f"Patient/{donor['id']}").json() == donor
    assert read(client, f"Task/{doomed['id']}").status_code == 410
    assert read(client, f"Task/{patched['id']}").json()["status"] == "completed"


def test_batch_runs_entries_in_request_order(client: TestClient) -> None:
    doomed = create(client, task())
    entries = post_bundle(client, batch(
        entry("GET", f"Task/{doomed['id']}"),
        entry("DELETE", f"Task/{doomed['id']}"),
        entry("GET", f"Task/{doomed['id']}"),
    )).json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK", "200 OK", "410 Gone"]
    assert entries[0]["resource"] == doomed


def test_batch_does_not_share_a_transaction_between_entries(client: TestClient) -> None:
    """A urn:uuid is only a transaction's: in a batch it stays as written."""
    entries = post_bundle(client, batch(
        entry("POST", "Patient", patient(), "urn:uuid:5c4d1e0a-0000-4000-8000-000000000001"),
        entry("POST", "Task", task(**{"for": {
            "reference": "urn:uuid:5c4d1e0a-0000-4000-8000-000000000001"}})),
    )).json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created", "201 Created"]
    assert entries[1]["resource"]["for"] == {
        "reference": "urn:uuid:5c4d1e0a-0000-4000-8000-000000000001"}


def test_batch_prefer_minimal_omits_resources(client: TestClient) -> None:
    response = post_bundle(client, batch(entry("POST", "Task", task())),
                           prefer="return=minimal")
    (only,) = response.json()["entry"]
    assert "resource" not in only
    assert only["response"]["status"] == "201 Created"
    assert only["response"]["etag"] == 'W/"1"'
    assert read(client, f"Task/{location_id(only['response']['location'])}").status_code == 200


def test_batch_head_entry_answers_without_a_body(client: TestClient) -> None:
    existing = create(client, task())
    (only,) = post_bundle(client, batch(entry("HEAD", f"Task/{existing['id']}"))).json()["entry"]
    assert only == {"response": {"status": "200 OK", "etag": 'W/"1"',
                                 "lastModified": existing["meta"]["lastUpdated"]}}
