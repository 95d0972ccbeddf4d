"""Subscriptions under partner access: a partner sees and changes only its organisation's
Subscriptions, is notified only of what it may read, and never of a patient's details if
its role works by chain-of-identity code alone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from gateway.settings import Settings
from gateway.store.database import Database
from tests.conftest import client_with
from tests.integration.auth_support import bearer
from tests.integration.subscription_support import (
    Receiver,
    receiving,
    subscription,
    subscription_settings,
    task,
)

LIMS_A, LIMS_B = "Organization/lims-a", "Organization/lims-b"


@pytest.fixture
def server(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, auth="smart", rate_limit_per_second=0,
                     **subscription_settings(settings)) as client:
        yield client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as receiver:
        yield receiver


def test_partners_are_told_only_of_their_own_and_without_patient_details(
        server: TestClient, db: Database, receiver: Receiver) -> None:
    admin = bearer(server, db, "admin", "Organization/atm")
    lims_a = bearer(server, db, "lims", LIMS_A)
    lims_b = bearer(server, db, "lims", LIMS_B)
    for who, path in ((lims_a, "/a"), (lims_b, "/b")):
        body = subscription(receiver.url(path), content="full-resource")
        response = server.post("/fhir/Subscription", json=body, headers=who)
        assert response.status_code == 201, response.text
    receiver.wait_for(lambda r: len(r.of_kind("handshake")) == 2)
    patient = server.post("/fhir/Patient", headers=admin, json={
        "resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jane"]}]}).json()
    for_patient = {"for": {"reference": f"Patient/{patient['id']}", "display": "Jane Doe"}}
    mine = server.post("/fhir/Task", headers=admin, json=task(LIMS_A, **for_patient)).json()
    server.post("/fhir/Task", headers=admin, json=task("Organization/elsewhere"))
    receiver.wait_for(lambda r: bool(r.event_numbers("/a")))
    time.sleep(0.5)
    assert receiver.event_numbers("/b") == []
    notification = receiver.of_kind("event-notification", "/a")[0]
    delivered = notification.bundle["entry"][1]["resource"]
    assert delivered["id"] == mine["id"]
    assert delivered["for"] == {"reference": f"Patient/{patient['id']}"}
    assert "Jane" not in str(notification.bundle) and "Doe" not in str(notification.bundle)


def test_a_partner_sees_and_changes_only_its_own_subscriptions(
        server: TestClient, db: Database, receiver: Receiver) -> None:
    lims_a = bearer(server, db, "lims", LIMS_A)
    lims_b = bearer(server, db, "lims", LIMS_B)
    body = subscription(receiver.url())
    # A claims to be B's organisation: the server decides whose it is.
    body["meta"] = {"tag": [{
        "system": "https://atm-gateway.org/fhir/CodeSystem/subscriber-organization",
        "code": LIMS_B}]}
    created = server.post("/fhir/Subscription", json=body, headers=lims_a).json()
    tags = {t["system"].rsplit("/", 1)[1]: t["code"] for t in created["meta"]["tag"]}
    assert tags["subscriber-organization"] == LIMS_A
    assert tags["subscriber-client"] == lims_a["x-client"]
    sid = created["id"]
    assert server.get(f"/fhir/Subscription/{sid}", headers=lims_a).status_code == 200
    for path in (f"Subscription/{sid}", f"Subscription/{sid}/$status",
                 f"Subscription/{sid}/$events"):
        assert server.get(f"/fhir/{path}", headers=lims_b).status_code == 404, path
    assert server.get("/fhir/Subscription", headers=lims_b).json().get("total", 0) == 0
    taken = {**created, "channel": {**created["channel"], "endpoint": receiver.url("/b")}}
    assert server.put(f"/fhir/Subscription/{sid}", json=taken,
                      headers=lims_b).status_code in (403, 404)
    assert server.delete(f"/fhir/Subscription/{sid}", headers=lims_b).status_code == 404


def test_topics_are_readable_not_writable_by_partners(
        server: TestClient, db: Database) -> None:
    lims = bearer(server, db, "lims", LIMS_A)
    listed = server.get("/fhir/SubscriptionTopic", headers=lims)
    assert listed.status_code == 200 and listed.json()["entry"]
    topic = listed.json()["entry"][0]["resource"]
    assert server.put(f"/fhir/SubscriptionTopic/{topic['id']}", json=topic,
                      headers=lims).status_code == 403
