"""Each partner sees only what concerns its organisation: another partner's resource
answers exactly like one that does not exist, searches and their totals count only what
is visible, and a partner cannot write what it could not then see."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from gateway.store.database import Database
from tests.conftest import client_with
from tests.factories import task
from tests.integration.auth_support import A, B, bearer


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, auth="smart") as test_client:
        yield test_client



@pytest.fixture
def world(client: TestClient, db: Database) -> dict[str, Any]:
    """Two couriers' Tasks and the Specimens they carry, written by an EHR."""
    ehr = bearer(client, db, "ehr", "Organization/hospital")
    made: dict[str, Any] = {"ehr": ehr}
    for name, owner in (("a", A), ("b", B)):
        specimen = client.post("/fhir/Specimen", headers=ehr, json={
            "resourceType": "Specimen", "status": "available"}).json()
        for n in range(2):
            made[f"task_{name}{n}"] = client.post("/fhir/Task", headers=ehr, json=task(
                owner={"reference": owner},
                focus={"reference": f"Specimen/{specimen['id']}"})).json()
        made[f"specimen_{name}"] = specimen
    made["courier_a"] = bearer(client, db, "courier", A)
    return made


def ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"}


def test_searches_and_totals_see_only_the_partners_own(client: TestClient,
                                                        world: dict[str, Any]) -> None:
    courier = world["courier_a"]
    found = client.get("/fhir/Task?_total=accurate", headers=courier).json()
    assert ids(found) == {world["task_a0"]["id"], world["task_a1"]["id"]}
    assert found["total"] == 2
    assert client.get("/fhir/Task?_summary=count", headers=courier).json()["total"] == 2
    assert client.get("/fhir/Task?status=ready", headers=courier).json()["total"] == 2
    first = client.get("/fhir/Task?_count=1", headers=courier).json()
    following = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = client.get(following.replace("http://testserver", ""), headers=courier).json()
    assert ids(first) | ids(second) == {world["task_a0"]["id"], world["task_a1"]["id"]}
    specimens = client.get("/fhir/Specimen", headers=courier).json()
    assert ids(specimens) == {world["specimen_a"]["id"]}


def test_another_partners_resource_answers_like_a_missing_one(
        client: TestClient, world: dict[str, Any]) -> None:
    courier, theirs = world["courier_a"], world["task_b0"]["id"]
    missing = client.get("/fhir/Task/no-such-task", headers=courier)
    hidden = client.get(f"/fhir/Task/{theirs}", headers=courier)
    assert (hidden.status_code, missing.status_code) == (404, 404)
    assert hidden.json()["issue"][0]["diagnostics"] == f"Task/{theirs} is not known"
    for path in (f"/fhir/Task/{theirs}/_history/1", f"/fhir/Task/{theirs}/_history",
                 f"/fhir/Specimen/{world['specimen_b']['id']}"):
        assert client.get(path, headers=courier).status_code == 404, path
    assert client.get("/fhir/Task/_history", headers=courier).status_code == 403
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Task/{theirs}"}},
        {"request": {"method": "GET", "url": f"Task/{world['task_a0']['id']}"}}]}
    answers = client.post("/fhir", json=batch, headers=courier).json()["entry"]
    assert [a["response"]["status"][:3] for a in answers] == ["404", "200"]


def test_a_partner_cannot_write_what_it_could_not_then_see(
        client: TestClient, world: dict[str, Any]) -> None:
    courier, ehr = world["courier_a"], world["ehr"]
    theirs = client.get(f"/fhir/Task/{world['task_b0']['id']}", headers=ehr).json()
    refused = client.put(f"/fhir/Task/{theirs['id']}", headers=courier,
                         json={**theirs, "status": "in-progress"})
    assert refused.status_code == 404
    mine = client.get(f"/fhir/Task/{world['task_a0']['id']}", headers=courier).json()
    handed_over = client.put(f"/fhir/Task/{mine['id']}", headers=courier,
                             json={**mine, "owner": {"reference": B}})
    assert handed_over.status_code == 403
    patched = client.patch(f"/fhir/Task/{theirs['id']}", headers={
        **courier, "content-type": "application/json-patch+json"},
        json=[{"op": "replace", "path": "/status", "value": "in-progress"}])
    assert patched.status_code == 404
    for resource in (theirs, mine):  # nothing changed
        now = client.get(f"/fhir/Task/{resource['id']}", headers=ehr).json()
        assert now["meta"]["versionId"] == "1" and now["owner"] == resource["owner"]
    moved = client.put(f"/fhir/Task/{mine['id']}", headers=courier,
                       json={**mine, "status": "in-progress"})
    assert moved.status_code == 200  # its own, kept its own: fine


def test_conditional_interactions_do_not_reveal_other_partners_resources(
        client: TestClient, world: dict[str, Any]) -> None:
    courier, theirs = world["courier_a"], world["task_b0"]["id"]
    response = client.patch(f"/fhir/Task?_id={theirs}", headers={
        **world["courier_a"], "content-type": "application/json-patch+json"},
        json=[{"op": "replace", "path": "/status", "value": "in-progress"}])
    assert response.status_code == 404  # R4: no match
    assert client.get(f"/fhir/Task?_id={theirs}", headers=courier).json()["total"] == 0


def test_a_role_that_sees_only_its_own_cannot_search_across_types(
        client: TestClient, world: dict[str, Any]) -> None:
    for path in ("/fhir/_history", "/fhir?_type=Task", "/fhir/Task?_include=Task:focus"):
        assert client.get(path, headers=world["courier_a"]).status_code == 403, path
    assert client.get("/fhir/Task?_include=Task:focus",
                      headers=world["ehr"]).status_code == 200


def test_a_put_that_would_create_needs_the_create_right(
        client: TestClient, world: dict[str, Any]) -> None:
    # A courier may update Tasks but not create them, not even by PUT to a new id.
    new = task(id="courier-made", owner={"reference": A})
    refused = client.put("/fhir/Task/courier-made", json=new, headers=world["courier_a"])
    assert refused.status_code == 403
    assert "this PUT would create it" in refused.json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Task/courier-made", headers=world["ehr"]).status_code == 404
