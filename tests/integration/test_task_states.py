"""The Task state machine enforced on every writer over HTTP: update, conditional update,
JSON Patch, batch and transaction entries, and racing clients; on SQLite and PostgreSQL
(https://hl7.org/fhir/R4/task.html#statemachine)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.store.database import Database
from tests.factories import identifier, task
from tests.integration.bundles_support import (
    batch,
    entry,
    outcome,
    patch_binary,
    post_bundle,
    row_counts,
    transaction,
)

FHIR = {"Content-Type": "application/fhir+json"}
PATCH = {"Content-Type": "application/json-patch+json"}
SYSTEM = "urn:example:step"


def create(client: TestClient, status: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/fhir/Task", json=task(status=status, **fields), headers=FHIR)
    assert response.status_code == 201, response.text
    return dict(response.json())


def put(client: TestClient, stored: dict[str, Any], status: str,
        **fields: Any) -> httpx.Response:
    return client.put(f"/fhir/Task/{stored['id']}",
                      json=task(id=stored["id"], status=status, **fields), headers=FHIR)


def patch_status(client: TestClient, stored: dict[str, Any], status: str) -> httpx.Response:
    ops = [{"op": "replace", "path": "/status", "value": status}]
    return client.patch(f"/fhir/Task/{stored['id']}", content=json.dumps(ops), headers=PATCH)


def refused(resource_id: str, old: str, new: str, allowed: str) -> dict[str, Any]:
    """The whole OperationOutcome of a refused change."""
    return {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "business-rule",
        "diagnostics": f"Task/{resource_id}: status cannot change from {old} to {new}; "
                       f"from {old} it can only change to {allowed}",
        "expression": ["Task.status"]}]}


def assert_unchanged(client: TestClient, stored: dict[str, Any]) -> None:
    """The current version is the one stored before, and no other version was written."""
    current = client.get(f"/fhir/Task/{stored['id']}")
    assert current.json() == stored
    assert current.headers["etag"] == f'W/"{stored["meta"]["versionId"]}"'
    history = client.get(f"/fhir/Task/{stored['id']}/_history").json()
    assert len(history["entry"]) == int(stored["meta"]["versionId"])


# -- update -------------------------------------------------------------------------------
def test_update_completed_task_to_in_progress_returns_422_and_stores_nothing(
        client: TestClient) -> None:
    stored = create(client, "completed")

    response = put(client, stored, "in-progress")

    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json() == refused(stored["id"], "completed", "in-progress",
                                      "entered-in-error")
    assert_unchanged(client, stored)


def test_update_along_allowed_transitions_stores_each_version(client: TestClient) -> None:
    stored = create(client, "draft")

    for status in ("requested", "accepted", "in-progress", "on-hold", "in-progress",
                   "completed", "entered-in-error"):
        response = put(client, stored, status)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == status

    history = client.get(f"/fhir/Task/{stored['id']}/_history").json()
    assert len(history["entry"]) == 8


def test_update_ready_task_to_completed_directly_is_allowed(client: TestClient) -> None:
    stored = create(client, "ready")

    response = put(client, stored, "completed")

    assert response.status_code == 200, response.text
    assert response.json()["meta"]["versionId"] == "2"


def test_update_keeping_a_terminal_status_may_change_other_elements(
        client: TestClient) -> None:
    stored = create(client, "completed", description="before")

    response = put(client, stored, "completed", description="after")

    assert response.status_code == 200, response.text
    assert (response.json()["description"], response.json()["meta"]["versionId"]) == (
        "after", "2")


def test_update_with_stale_if_match_answers_412_before_the_state_machine(
        client: TestClient) -> None:
    stored = create(client, "completed")

    response = client.put(f"/fhir/Task/{stored['id']}", headers={**FHIR, "If-Match": 'W/"9"'},
                          json=task(id=stored["id"], status="in-progress"))

    assert response.status_code == 412
    assert_unchanged(client, stored)


def test_create_may_use_any_status_and_update_as_create_too(client: TestClient) -> None:
    assert create(client, "entered-in-error")["status"] == "entered-in-error"

    response = client.put("/fhir/Task/imported-1", json=task(id="imported-1",
                                                             status="completed"), headers=FHIR)

    assert response.status_code == 201, response.text


def test_update_after_delete_is_a_create_and_may_use_any_status(client: TestClient) -> None:
    stored = create(client, "completed")
    assert client.delete(f"/fhir/Task/{stored['id']}").status_code == 200

    response = put(client, stored, "in-progress")

    assert response.status_code == 201, response.text
    assert response.json()["meta"]["versionId"] == "3"


def test_conditional_update_refused_change_returns_422_and_stores_nothing(
        client: TestClient) -> None:
    stored = create(client, "cancelled", identifier=identifier(SYSTEM, "C-1"))

    response = client.put(f"/fhir/Task?identifier={SYSTEM}|C-1", headers=FHIR,
                          json=task(status="ready", identifier=identifier(SYSTEM, "C-1")))

    assert response.status_code == 422
    assert response.json() == refused(stored["id"], "cancelled", "ready", "entered-in-error")
    assert_unchanged(client, stored)


# -- patch --------------------------------------------------------------------------------
def test_patch_refused_change_returns_422_and_stores_nothing(client: TestClient) -> None:
    stored = create(client, "failed")

    response = patch_status(client, stored, "in-progress")

    assert response.status_code == 422
    assert response.json() == refused(stored["id"], "failed", "in-progress",
                                      "entered-in-error")
    assert_unchanged(client, stored)


def test_patch_allowed_change_is_stored(client: TestClient) -> None:
    stored = create(client, "in-progress")

    response = patch_status(client, stored, "on-hold")

    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["meta"]["versionId"]) == (
        "on-hold", "2")


def test_conditional_patch_refused_change_returns_422(client: TestClient) -> None:
    stored = create(client, "requested", identifier=identifier(SYSTEM, "P-1"))
    ops = [{"op": "replace", "path": "/status", "value": "draft"}]

    response = client.patch(f"/fhir/Task?identifier={SYSTEM}|P-1", content=json.dumps(ops),
                            headers=PATCH)

    assert response.status_code == 422
    assert response.json() == refused(
        stored["id"], "requested", "draft",
        "received, accepted, rejected, ready, cancelled, in-progress, entered-in-error")
    assert_unchanged(client, stored)


# -- bundles ------------------------------------------------------------------------------
def test_transaction_with_one_refused_entry_stores_nothing(
        client: TestClient, db: Database) -> None:
    ready = create(client, "ready")
    done = create(client, "completed")
    before = row_counts(db)

    response = post_bundle(client, transaction(
        entry("POST", "Task", task(identifier=identifier(SYSTEM, "ghost"))),
        entry("PUT", f"Task/{ready['id']}", task(id=ready["id"], status="in-progress")),
        entry("PATCH", f"Task/{done['id']}", patch_binary(
            [{"op": "replace", "path": "/status", "value": "ready"}]))))

    assert outcome(422, response) == [{
        "severity": "error", "code": "business-rule",
        "diagnostics": f"Bundle.entry[2] (PATCH Task/{done['id']}): Task/{done['id']}: status "
                       "cannot change from completed to ready; from completed it can only "
                       "change to entered-in-error",
        "expression": ["Bundle.entry[2].resource.status"]}]
    assert row_counts(db) == before
    assert_unchanged(client, ready)
    assert_unchanged(client, done)


def test_transaction_of_allowed_changes_stores_them(client: TestClient) -> None:
    ready = create(client, "ready")
    held = create(client, "on-hold")

    response = post_bundle(client, transaction(
        entry("PUT", f"Task/{ready['id']}", task(id=ready["id"], status="completed")),
        entry("PATCH", f"Task/{held['id']}", patch_binary(
            [{"op": "replace", "path": "/status", "value": "in-progress"}]))))

    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses == ["200 OK", "200 OK"]
    assert client.get(f"/fhir/Task/{held['id']}").json()["status"] == "in-progress"


def test_batch_refuses_only_the_entry_that_breaks_the_machine(client: TestClient) -> None:
    ready = create(client, "ready")
    done = create(client, "completed")

    response = post_bundle(client, batch(
        entry("PUT", f"Task/{ready['id']}", task(id=ready["id"], status="in-progress")),
        entry("PUT", f"Task/{done['id']}", task(id=done["id"], status="ready"))))

    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"] == "200 OK"
    assert second["response"]["status"] == "422 Unprocessable Entity"
    assert second["response"]["outcome"] == refused(done["id"], "completed", "ready",
                                                    "entered-in-error")
    assert_unchanged(client, done)


# -- racing writers -----------------------------------------------------------------------
@pytest.fixture
def http(live_server: str) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with httpx.Client(base_url=live_server, timeout=60, limits=limits) as client:
        yield client


def test_racing_updates_cannot_both_pass_the_check_on_a_stale_version(
        http: httpx.Client) -> None:
    """From ready, completed and cancelled are both allowed but neither leads to the other:
    whichever lands first, every writer of the other status must then be refused."""
    stored = http.post("/Task", json=task(status="ready"), headers=FHIR).json()
    wanted = ["completed", "cancelled"] * 4
    barrier = Barrier(len(wanted), timeout=30)

    def send(status: str) -> httpx.Response:
        barrier.wait()
        return http.put(f"/Task/{stored['id']}", headers=FHIR,
                        json=task(id=stored["id"], status=status))

    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        responses = list(pool.map(send, wanted))

    winner = http.get(f"/Task/{stored['id']}").json()["status"]
    codes = Counter((status, r.status_code) for status, r in zip(wanted, responses, strict=True))
    loser = "cancelled" if winner == "completed" else "completed"
    assert codes == {(winner, 200): 4, (loser, 422): 4}, [r.text for r in responses]
    history = http.get(f"/Task/{stored['id']}/_history", params={"_count": "50"}).json()
    assert [e["resource"]["status"] for e in history["entry"]] == [winner] * 4 + ["ready"]
