"""Transaction Bundles end to end: responses, ordering and all-or-nothing storage.

https://hl7.org/fhir/R4/http.html#transaction
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.store.database import Database
from tests.factories import identifier, patient, ref, task
from tests.integration.bundles_support import (
    BASE,
    create,
    entry,
    ids_of,
    location_id,
    outcome,
    patch_binary,
    post_bundle,
    read,
    row_counts,
    transaction,
)


@pytest.fixture
def seeded(client: TestClient) -> dict[str, dict[str, Any]]:
    """A Patient to update, a Task to delete, a Task to patch and one left alone."""
    return {"patient": create(client, patient()),
            "doomed": create(client, task(description="doomed")),
            "patched": create(client, task(description="patched")),
            "bystander": create(client, task(description="bystander"))}


def _mixed_transaction(seeded: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Entries deliberately out of the spec's processing order: GETs first, DELETE late."""
    pat, doomed, patched = seeded["patient"], seeded["doomed"], seeded["patched"]
    return transaction(
        entry("GET", "Task?status=ready"),
        entry("POST", "Patient", patient(name=[{"family": "Martin"}])),
        entry("PUT", f"Patient/{pat['id']}", {**patient(active=False), "id": pat["id"]}),
        entry("DELETE", f"Task/{doomed['id']}"),
        entry("PATCH", f"Task/{patched['id']}", patch_binary(
            [{"op": "replace", "path": "/status", "value": "in-progress"}])),
        entry("GET", f"Patient/{pat['id']}"),
    )


def test_transaction_mixed_entries_answer_in_request_order(
        client: TestClient, seeded: dict[str, dict[str, Any]]) -> None:
    response = post_bundle(client, _mixed_transaction(seeded))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "transaction-response"
    entries = body["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "200 OK", "201 Created", "200 OK", "200 OK", "200 OK", "200 OK"]
    search, created, updated, deleted, patched, got = entries
    assert search["resource"]["type"] == "searchset"
    assert created["resource"]["name"] == [{"family": "Martin"}]
    assert updated["resource"]["active"] is False
    assert deleted["response"]["etag"] == 'W/"2"'
    assert deleted["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert patched["resource"]["status"] == "in-progress"
    assert got["resource"] == updated["resource"]


def test_transaction_write_entries_carry_location_etag_and_last_modified(
        client: TestClient, seeded: dict[str, dict[str, Any]]) -> None:
    entries = post_bundle(client, _mixed_transaction(seeded)).json()["entry"]
    for written in (entries[1], entries[2], entries[4]):
        resource, answer = written["resource"], written["response"]
        reference = f"{resource['resourceType']}/{resource['id']}"
        version = resource["meta"]["versionId"]
        assert written["fullUrl"] == f"{BASE}/{reference}"
        assert answer["location"] == f"{BASE}/{reference}/_history/{version}"
        assert answer["etag"] == f'W/"{version}"'
        assert answer["lastModified"] == resource["meta"]["lastUpdated"]
        assert read(client, reference).json() == resource


def test_transaction_get_sees_the_state_after_the_writes(
        client: TestClient, seeded: dict[str, dict[str, Any]]) -> None:
    entries = post_bundle(client, _mixed_transaction(seeded)).json()["entry"]
    found = [e["resource"]["id"] for e in entries[0]["resource"].get("entry", [])]
    # The deleted and the patched Tasks are no longer "ready" by the time GET runs.
    assert found == [seeded["bystander"]["id"]]
    assert entries[5]["resource"]["meta"]["versionId"] == "2"


def test_transaction_prefer_minimal_omits_resources_but_keeps_response_headers(
        client: TestClient, seeded: dict[str, dict[str, Any]]) -> None:
    response = post_bundle(client, _mixed_transaction(seeded), prefer="return=minimal")
    entries = response.json()["entry"]
    for written in (entries[1], entries[2], entries[4]):
        assert "resource" not in written
        assert set(written["response"]) == {"status", "location", "etag", "lastModified"}
    created_id = location_id(entries[1]["response"]["location"])
    assert read(client, f"Patient/{created_id}").status_code == 200


def test_transaction_empty_answers_an_empty_transaction_response(client: TestClient) -> None:
    response = post_bundle(client, {"resourceType": "Bundle", "type": "transaction"})
    assert response.status_code == 200
    assert response.json() == {"resourceType": "Bundle", "type": "transaction-response"}


# -- atomicity ---------------------------------------------------------------------------
def _good_entries(seeded: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        entry("POST", "Patient", patient(name=[{"family": "Ghost"}]), "urn:uuid:9a0c1a52-1"),
        entry("POST", "Task", task(identifier=identifier("urn:ghost", "1"),
                                   **{"for": ref("urn:uuid:9a0c1a52-1")})),
        entry("DELETE", f"Task/{seeded['doomed']['id']}"),
        entry("PATCH", f"Task/{seeded['patched']['id']}", patch_binary(
            [{"op": "replace", "path": "/status", "value": "cancelled"}])),
    ]


def _assert_nothing_changed(client: TestClient, db: Database, before: dict[str, int],
                            seeded: dict[str, dict[str, Any]]) -> None:
    assert row_counts(db) == before
    assert ids_of(client, "Patient?family=Ghost") == []
    assert ids_of(client, "Task?identifier=urn:ghost|1") == []
    for key in ("doomed", "patched"):
        assert read(client, f"Task/{seeded[key]['id']}").json() == seeded[key]


def test_transaction_with_invalid_last_entry_leaves_nothing_behind(
        client: TestClient, db: Database, seeded: dict[str, dict[str, Any]]) -> None:
    before = row_counts(db)
    invalid = {k: v for k, v in task().items() if k != "status"}
    response = post_bundle(client, transaction(*_good_entries(seeded),
                                               entry("POST", "Task", invalid)))
    assert outcome(400, response) == [{
        "severity": "error", "code": "invalid",
        "diagnostics": "Bundle.entry[4] (POST Task): Value for the field 'status' is required.",
        "expression": ["Bundle.entry[4].resource.status"]}]
    _assert_nothing_changed(client, db, before, seeded)


def test_transaction_with_stale_if_match_on_last_entry_fails_412_and_leaves_nothing(
        client: TestClient, db: Database, seeded: dict[str, dict[str, Any]]) -> None:
    before = row_counts(db)
    pat_id = seeded["patient"]["id"]
    stale = entry("PUT", f"Patient/{pat_id}", {**patient(), "id": pat_id}, ifMatch='W/"7"')
    response = post_bundle(client, transaction(*_good_entries(seeded), stale))
    assert outcome(412, response) == [{
        "severity": "error", "code": "conflict",
        "diagnostics": f"Bundle.entry[4] (PUT Patient/{pat_id}): Version 7 is not the current "
                       f"version of Patient/{pat_id} (it is 1)",
        "expression": ["Bundle.entry[4]"]}]
    _assert_nothing_changed(client, db, before, seeded)


def test_transaction_with_ambiguous_conditional_create_fails_412_and_leaves_nothing(
        client: TestClient, db: Database, seeded: dict[str, dict[str, Any]]) -> None:
    for _ in range(2):
        create(client, patient(identifier=identifier("urn:x", "twin")))
    before = row_counts(db)
    ambiguous = entry("POST", "Patient", patient(), ifNoneExist="identifier=urn:x|twin")
    response = post_bundle(client, transaction(*_good_entries(seeded), ambiguous))
    assert outcome(412, response) == [{
        "severity": "error", "code": "multiple-matches",
        "diagnostics": "Bundle.entry[4] (POST Patient): ifNoneExist matched several Patient "
                       "resources",
        "expression": ["Bundle.entry[4]"]}]
    _assert_nothing_changed(client, db, before, seeded)


def test_transaction_failure_leaves_no_history_and_no_change_log(
        client: TestClient, db: Database, seeded: dict[str, dict[str, Any]]) -> None:
    history_before = client.get("/fhir/_history?_count=50").json()["entry"]
    pat_id = seeded["patient"]["id"]
    failing = entry("PUT", f"Patient/{pat_id}", {**patient(), "id": "other"})
    response = post_bundle(client, transaction(*_good_entries(seeded), failing))
    assert response.status_code == 400, response.text
    assert client.get("/fhir/_history?_count=50").json()["entry"] == history_before
    doomed_history = client.get(f"/fhir/Task/{seeded['doomed']['id']}/_history").json()
    assert [e["resource"]["meta"]["versionId"] for e in doomed_history["entry"]] == ["1"]


def test_transaction_whose_read_finds_nothing_fails_404_and_leaves_nothing(
        client: TestClient, db: Database, seeded: dict[str, dict[str, Any]]) -> None:
    before = row_counts(db)
    response = post_bundle(client, transaction(*_good_entries(seeded),
                                               entry("GET", "Patient/nobody")))
    assert outcome(404, response) == [{
        "severity": "error", "code": "not-found",
        "diagnostics": "Bundle.entry[4] (GET Patient/nobody): Patient/nobody is not known",
        "expression": ["Bundle.entry[4]"]}]
    _assert_nothing_changed(client, db, before, seeded)
