"""Topic-based Subscriptions (Subscriptions Backport IG, rest-hook): topics, what a
Subscription may ask for, handshakes, payloads, filters, heartbeats, $status and $events,
retries and recovery, every version delivered, the audit of each attempt. Notifications
go over real HTTP to receivers on 127.0.0.1; the server matches and delivers in its own
threads, as `atm serve` does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from gateway.settings import Settings
from gateway.store.database import Database
from tests.conftest import client_with
from tests.integration.custody_support import enrol
from tests.integration.subscription_support import (
    BACKPORT,
    FHIR,
    TOPICS,
    Receiver,
    receiving,
    subscription,
    subscription_settings,
    task,
)


@pytest.fixture
def server(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, **subscription_settings(settings)) as client:
        yield client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as receiver:
        yield receiver


def subscribe(client: TestClient, body: dict[str, Any]) -> str:
    response = client.post("/fhir/Subscription", json=body, headers=FHIR)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "requested"
    return str(response.json()["id"])


def status_of(client: TestClient, subscription_id: str) -> str:
    return str(client.get(f"/fhir/Subscription/{subscription_id}").json()["status"])


def wait_status(client: TestClient, subscription_id: str, wanted: str,
                seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while (status := status_of(client, subscription_id)) != wanted:
        assert time.monotonic() < deadline, f"status stayed {status}, not {wanted}"
        time.sleep(0.05)


def create(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR)
    assert response.status_code == 201, response.text
    return dict(response.json())


def put(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}",
                          json=resource, headers=FHIR)
    assert response.status_code == 200, response.text
    return dict(response.json())


# -- topics ----------------------------------------------------------------
def test_shipped_topics_are_listed_and_found_by_url(server: TestClient) -> None:
    listed = server.get("/fhir/SubscriptionTopic").json()
    urls = {e["resource"]["url"] for e in listed["entry"]}
    assert {TOPICS + name for name in ("manufacturing-order", "task-status", "product-status",
                                       "custody-event", "appointment-changed",
                                       "careplan-status", "communication-sent")} <= urls
    found = server.get("/fhir/SubscriptionTopic", params={"url": TOPICS + "custody-event"})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == ["custody-event"]


def test_a_topic_that_cannot_run_is_refused(server: TestClient) -> None:
    bad_fhirpath = {"resourceType": "SubscriptionTopic", "url": "https://example.org/t",
                    "status": "active", "resourceTrigger": [{
                        "resource": "http://hl7.org/fhir/StructureDefinition/Task",
                        "fhirPathCriteria": "%current.status = = 'x'"}]}
    response = server.post("/fhir/SubscriptionTopic", json=bad_fhirpath, headers=FHIR)
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == [
        "SubscriptionTopic.resourceTrigger[0].fhirPathCriteria"]
    unknown_filter = {**bad_fhirpath, "resourceTrigger": [{
        "resource": "http://hl7.org/fhir/StructureDefinition/Task"}],
        "canFilterBy": [{"resource": "Task", "filterParameter": "colour"}]}
    response = server.post("/fhir/SubscriptionTopic", json=unknown_filter, headers=FHIR)
    assert response.status_code == 422
    assert "colour" in response.json()["issue"][0]["diagnostics"]


def test_a_users_own_topic_with_query_criteria(server: TestClient, receiver: Receiver) -> None:
    """Task completions only: previous status not completed, current completed."""
    topic = {"resourceType": "SubscriptionTopic", "url": "https://example.org/completed",
             "status": "active", "title": "Task completed", "resourceTrigger": [{
                 "resource": "http://hl7.org/fhir/StructureDefinition/Task",
                 "supportedInteraction": ["create", "update"],
                 "queryCriteria": {"previous": "status:not=completed",
                                   "resultForCreate": "test-passes",
                                   "current": "status=completed", "requireBoth": True}}],
             "canFilterBy": [{"resource": "Task", "filterParameter": "owner"}]}
    create(server, topic)
    body = subscription(receiver.url(), "x")
    body["criteria"] = "https://example.org/completed"
    subscribe(server, body)
    receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
    first = create(server, task(status="in-progress"))
    put(server, {**first, "status": "completed"})
    put(server, {**first, "status": "completed", "description": "again"})  # no change
    created_done = create(server, task(status="completed"))
    receiver.wait_for(lambda r: len(r.event_numbers()) >= 2)
    time.sleep(0.3)
    focuses = [e["focus"] for r in receiver.of_kind("event-notification") for e in r.events]
    assert focuses == [f"http://testserver/fhir/Task/{first['id']}/_history/2",
                       f"http://testserver/fhir/Task/{created_done['id']}/_history/1"]


# -- what a Subscription may ask for -------------------------------------------------------
REFUSALS = [
    ({"criteria": TOPICS + "no-such-topic"}, "Subscription.criteria", "No SubscriptionTopic"),
    ({"_criteria": {"extension": [{"url": BACKPORT + "backport-filter-criteria",
                                   "valueString": "Task?description=x"}]}},
     "Subscription.criteria.extension", "cannot filter Task by 'description'"),
    ({"_criteria": {"extension": [{"url": BACKPORT + "backport-filter-criteria",
                                   "valueString": "owner=Organization/x"}]}},
     "Subscription.criteria.extension", "Type?param=value"),
    ({"channel": {"type": "email", "endpoint": "mailto:x@example.org"}},
     "Subscription.channel.type", "not supported"),
    ({"channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x",
                  "payload": "application/fhir+json", "_payload": {"extension": [
                      {"url": BACKPORT + "backport-payload-content", "valueCode": "all"}]}}},
     "Subscription.channel.payload", "not supported"),
    ({"channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x",
                  "payload": "application/xml"}}, "Subscription.channel.payload", "xml"),
    ({"channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x", "extension": [
        {"url": BACKPORT + "backport-timeout", "valueUnsignedInt": 100000}]}},
     "Subscription.channel.extension", "backport-timeout"),
    ({"channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x",
                  "header": ["Authorization: x\r\nInjected: y"]}},
     "Subscription.channel.header[0]", "one line"),
]


@pytest.mark.parametrize(("change", "where", "says"), REFUSALS,
                         ids=[r[1] + ":" + r[2] for r in REFUSALS])
def test_unsupported_subscriptions_are_refused_and_nothing_is_stored(
        server: TestClient, change: dict[str, Any], where: str, says: str) -> None:
    body = {**subscription("http://127.0.0.1:9/x"), **change}
    response = server.post("/fhir/Subscription", json=body, headers=FHIR)
    assert response.status_code == 422, response.text
    issue = response.json()["issue"][0]
    assert issue["expression"] == [where]
    assert says in issue["diagnostics"]
    assert server.get("/fhir/Subscription?_summary=count").json()["total"] == 0


@pytest.mark.parametrize("endpoint", [
    "http://10.0.0.5/hook", "http://169.254.169.254/latest/meta-data",
    "http://localhost:8080/x", "http://127.0.0.1.example.org/x", "ftp://127.0.0.1/x",
    "http://user:secret@127.0.0.1/x", "not a url"])
def test_endpoints_off_the_allow_list_are_refused(server: TestClient, endpoint: str) -> None:
    """Server-side request forgery: the server never calls hosts it was not told to."""
    response = server.post("/fhir/Subscription", json=subscription(endpoint), headers=FHIR)
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == ["Subscription.channel.endpoint"]


def test_allow_list_forms(settings: Settings) -> None:
    from gateway.subscriptions.spec import host_allowed

    allowed = ["lims.example.org", "*.partner.example", "10.1.0.0/16", "127.0.0.1:9000"]
    assert host_allowed("LIMS.example.org", None, allowed)
    assert host_allowed("a.b.partner.example", 443, allowed)
    assert not host_allowed("partner.example.evil", 443, allowed)
    assert host_allowed("10.1.200.3", 80, allowed)
    assert not host_allowed("10.2.0.1", 80, allowed)
    assert host_allowed("127.0.0.1", 9000, allowed)
    assert not host_allowed("127.0.0.1", 9001, allowed)


# -- handshake and delivery ----------------------------------------------------------------
def test_handshake_activates_and_events_follow_in_order(
        server: TestClient, receiver: Receiver) -> None:
    subscription_id = subscribe(server, subscription(
        receiver.url(), headers=("Authorization: Bearer lims-secret",)))
    receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
    handshake = receiver.of_kind("handshake")[0]
    assert handshake.headers["authorization"] == "Bearer lims-secret"
    assert handshake.headers["content-type"].startswith("application/fhir+json")
    assert handshake.bundle["type"] == "history"
    assert handshake.param("subscription") == {
        "reference": f"http://testserver/fhir/Subscription/{subscription_id}"}
    assert handshake.param("topic") == TOPICS + "task-status"
    wait_status(server, subscription_id, "active")
    written = create(server, task())
    for status in ("accepted", "in-progress", "completed"):
        written = put(server, {**written, "status": status})
    receiver.wait_for(lambda r: r.event_numbers()[-1:] == [4])
    assert receiver.event_numbers() == [1, 2, 3, 4]
    last = receiver.of_kind("event-notification")[-1]
    assert last.param("events-since-subscription-start") == "4"
    assert last.param("status") == "active"


def test_payload_kinds(server: TestClient, receiver: Receiver) -> None:
    for content in ("empty", "id-only", "full-resource"):
        subscribe(server, subscription(receiver.url(f"/{content}"), content=content))
    receiver.wait_for(lambda r: len(r.of_kind("handshake")) == 3)
    written = create(server, task())
    receiver.wait_for(lambda r: len(r.of_kind("event-notification")) == 3)
    by_path = {r.path: r for r in receiver.of_kind("event-notification")}
    empty, id_only, full = by_path["/empty"], by_path["/id-only"], by_path["/full-resource"]
    assert len(empty.bundle["entry"]) == 1
    assert empty.events == [{"event-number": "1", "timestamp": empty.events[0]["timestamp"],
                             "additional-context": []}]
    reference = f"http://testserver/fhir/Task/{written['id']}"
    for notification in (id_only, full):
        assert notification.events[0]["focus"] == reference + "/_history/1"
        entry = notification.bundle["entry"][1]
        assert entry["fullUrl"] == reference
        assert entry["request"] == {"method": "POST", "url": "Task"}
    assert "resource" not in id_only.bundle["entry"][1]
    assert full.bundle["entry"][1]["resource"]["id"] == written["id"]
    assert full.bundle["entry"][1]["resource"]["status"] == "requested"


def test_filters_select_what_is_delivered(server: TestClient, receiver: Receiver) -> None:
    subscribe(server, subscription(receiver.url(), filters=(
        "Task?owner=Organization/lims-a", "Task?status=completed")))
    receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
    mine = create(server, task("Organization/lims-a", status="in-progress"))
    create(server, task("Organization/lims-b", status="completed"))
    put(server, {**mine, "status": "completed"})
    receiver.wait_for(lambda r: len(r.event_numbers()) >= 1)
    time.sleep(0.3)
    focuses = [e["focus"] for r in receiver.of_kind("event-notification") for e in r.events]
    assert focuses == [f"http://testserver/fhir/Task/{mine['id']}/_history/2"]


def test_additional_context_is_the_topics_include(server: TestClient,
                                                  receiver: Receiver) -> None:
    subscribe(server, subscription(receiver.url(), content="full-resource"))
    receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
    product = create(server, {"resourceType": "BiologicallyDerivedProduct",
                              "productCategory": "cells", "status": "available"})
    create(server, task(focus={"reference": f"BiologicallyDerivedProduct/{product['id']}"}))
    receiver.wait_for(lambda r: bool(r.event_numbers()))
    notification = receiver.of_kind("event-notification")[0]
    product_url = f"http://testserver/fhir/BiologicallyDerivedProduct/{product['id']}"
    assert notification.events[0]["additional-context"] == [product_url]
    included = [e for e in notification.bundle["entry"] if e.get("fullUrl") == product_url]
    assert included[0]["resource"]["status"] == "available"


def test_every_version_is_delivered_not_only_the_latest(
        server: TestClient, receiver: Receiver) -> None:
    """Changes made faster than delivery each arrive with their own version."""
    subscribe(server, subscription(receiver.url(), content="full-resource", max_count=2))
    receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
    receiver.delay = 0.2  # the endpoint is slower than the writer
    written = create(server, task())
    statuses = ["accepted", "in-progress", "on-hold", "in-progress", "completed"]
    for status in statuses:
        written = put(server, {**written, "status": status})
    receiver.wait_for(lambda r: len(r.event_numbers()) == 6)
    delivered = [e["resource"]["status"] for r in receiver.of_kind("event-notification")
                 for e in r.bundle["entry"][1:]]
    assert delivered == ["requested", *statuses]
    assert receiver.event_numbers() == [1, 2, 3, 4, 5, 6]
    assert max(len(r.events) for r in receiver.of_kind("event-notification")) == 2


def test_custody_events_for_each_handoff(settings: Settings, db: Database,
                                        receiver: Receiver) -> None:
    with client_with(settings, **subscription_settings(settings),
                     load_protocols=True) as server:
        enrolment = enrol(server, db, settings)
        subscribe(server, subscription(receiver.url(), "custody-event",
                                       content="full-resource"))
        receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
        product, shipment = enrolment.product(), enrolment.task("shipment-to-manufacturer")
        for event, releasing, receiving_party, at in (
                ("pick-up", "apheresis", "courier", "2026-11-20T10:00:00Z"),
                ("receipt-at-manufacturing", "courier", "manufacturer",
                 "2026-11-20T18:00:00Z")):
            create(server, enrolment.handoff(
                event, product, shipment, releasing=releasing, receiving=receiving_party,
                signers=[(releasing, "released"), (receiving_party, "received")], at=at,
                location="manufacturing"))
        create(server, {"resourceType": "Provenance", "recorded": "2026-11-23T10:00:00Z",
                        "target": [{"reference": f"BiologicallyDerivedProduct/{product['id']}"}],
                        "agent": [{"who": {"reference": "Organization/courier"}}]})  # not custody
        receiver.wait_for(lambda r: len(r.event_numbers()) >= 2)
        time.sleep(0.3)
    codes = [e["resource"]["activity"]["coding"][0]["code"]
             for r in receiver.of_kind("event-notification") for e in r.bundle["entry"][1:]
             if e.get("resource", {}).get("resourceType") == "Provenance"]
    assert codes == ["pick-up", "receipt-at-manufacturing"]


def test_heartbeats_when_nothing_happens(server: TestClient, receiver: Receiver) -> None:
    subscribe(server, subscription(receiver.url(), heartbeat=1))
    receiver.wait_for(lambda r: len(r.of_kind("heartbeat")) >= 2, seconds=10)
    beat = receiver.of_kind("heartbeat")[0]
    assert beat.param("events-since-subscription-start") == "0"
    assert len(beat.bundle["entry"]) == 1


def test_nothing_is_matched_after_the_end(server: TestClient, receiver: Receiver) -> None:
    body = {**subscription(receiver.url(), heartbeat=1), "end": "2000-01-01T00:00:00Z"}
    subscribe(server, body)
    receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
    create(server, task())
    time.sleep(1.5)
    assert receiver.event_numbers() == []
    assert receiver.of_kind("heartbeat") == []
    bad = {**subscription(receiver.url()), "end": "soon"}
    assert server.post("/fhir/Subscription", json=bad, headers=FHIR).status_code in (400, 422)


# -- $status and $events ----------------------------------------------------------------
def test_status_and_events_operations(server: TestClient, receiver: Receiver) -> None:
    subscription_id = subscribe(server, subscription(receiver.url()))
    written = create(server, task())
    for status in ("accepted", "in-progress"):
        written = put(server, {**written, "status": status})
    receiver.wait_for(lambda r: len(r.event_numbers()) == 3)
    status = server.get(f"/fhir/Subscription/{subscription_id}/$status").json()
    assert status["type"] == "searchset"
    parameters = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert parameters["type"]["valueCode"] == "query-status"
    assert parameters["events-since-subscription-start"]["valueString"] == "3"
    assert parameters["status"]["valueCode"] == "active"
    by_type = server.get(f"/fhir/Subscription/$status?id={subscription_id}").json()
    assert by_type["total"] == 1

    events = server.get(f"/fhir/Subscription/{subscription_id}/$events",
                        params={"eventsSinceNumber": 2, "eventsUntilNumber": 3,
                                "content": "full-resource"}).json()
    assert events["type"] == "history"
    numbers = [part["valueString"] for p in events["entry"][0]["resource"]["parameter"]
               if p["name"] == "notification-event" for part in p["part"]
               if part["name"] == "event-number"]
    assert numbers == ["2", "3"]
    assert [e["resource"]["status"] for e in events["entry"][1:]] == ["accepted",
                                                                        "in-progress"]
    assert server.get(f"/fhir/Subscription/{subscription_id}/$events",
                      params={"eventsSinceNumber": "x"}).status_code == 400
    assert server.get("/fhir/Subscription/nope/$status").status_code == 404


# -- failures, retries, recovery -----------------------------------------------------------
def test_receiver_down_then_up_gets_every_event_in_order(
        server: TestClient, receiver: Receiver) -> None:
    subscription_id = subscribe(server, subscription(receiver.url(), max_count=3))
    wait_status(server, subscription_id, "active")
    receiver.down()
    written = create(server, task())
    for status in ("accepted", "in-progress", "on-hold", "in-progress", "completed"):
        written = put(server, {**written, "status": status})
    wait_status(server, subscription_id, "error")  # three failures in a row (the default)
    status = server.get(f"/fhir/Subscription/{subscription_id}/$status").json()
    error = [p for p in status["entry"][0]["resource"]["parameter"] if p["name"] == "error"]
    assert error and error[0]["valueCodeableConcept"]["text"]
    receiver.up()
    receiver.wait_for(lambda r: r.event_numbers()[-1:] == [6])
    assert receiver.event_numbers() == [1, 2, 3, 4, 5, 6]
    wait_status(server, subscription_id, "active")


def test_failed_handshake_is_an_error_until_the_endpoint_answers(
        server: TestClient, receiver: Receiver) -> None:
    receiver.answer = 503
    subscription_id = subscribe(server, subscription(receiver.url()))
    wait_status(server, subscription_id, "error")
    receiver.answer = 200
    wait_status(server, subscription_id, "active")
    assert len(receiver.of_kind("handshake")) == 1


def test_a_hung_endpoint_delays_no_other_subscription(settings: Settings) -> None:
    # subscription_timeout_seconds also bounds how long the server, stopping, waits for the
    # hung delivery (the slow Subscription's own timeout is 10 s): 1 s, not 10, keeps the
    # test from waiting the hang out.
    with client_with(settings, **subscription_settings(
            settings, subscription_timeout_seconds=1.0)) as server, \
            receiving(delay=4.0) as slow, receiving() as fast:
        subscribe(server, subscription(slow.url(), timeout=10))
        fast_id = subscribe(server, subscription(fast.url()))
        wait_status(server, fast_id, "active")
        started = time.monotonic()
        for _ in range(3):
            create(server, task())
        fast.wait_for(lambda r: len(r.event_numbers()) == 3, seconds=3)
        assert time.monotonic() - started < 3


def test_off_stops_delivery_and_requested_starts_it_again(
        server: TestClient, receiver: Receiver) -> None:
    subscription_id = subscribe(server, subscription(receiver.url()))
    wait_status(server, subscription_id, "active")
    stored = server.get(f"/fhir/Subscription/{subscription_id}").json()
    put(server, {**stored, "status": "off"})
    create(server, task())
    time.sleep(0.5)
    assert receiver.event_numbers() == []
    stored = server.get(f"/fhir/Subscription/{subscription_id}").json()
    assert stored["status"] == "off"
    put(server, {**stored, "status": "requested"})
    receiver.wait_for(lambda r: len(r.of_kind("handshake")) == 2)
    wait_status(server, subscription_id, "active")
    create(server, task())
    receiver.wait_for(lambda r: r.event_numbers() == [1])


def test_a_client_cannot_set_the_servers_statuses(server: TestClient, receiver: Receiver) -> None:
    receiver.answer = 503
    subscription_id = subscribe(server, {**subscription(receiver.url()), "status": "active"})
    wait_status(server, subscription_id, "error")
    stored = server.get(f"/fhir/Subscription/{subscription_id}").json()
    updated = put(server, {**stored, "status": "active", "reason": "still failing"})
    assert updated["status"] == "error"


def test_every_delivery_attempt_is_audited(server: TestClient, receiver: Receiver) -> None:
    receiver.answer = 500
    subscription_id = subscribe(server, subscription(receiver.url()))
    wait_status(server, subscription_id, "error")
    receiver.answer = 200
    wait_status(server, subscription_id, "active")
    create(server, task())
    receiver.wait_for(lambda r: r.event_numbers() == [1])
    # The attempt's record is stored with its outcome, just after the endpoint answered.
    deadline = time.monotonic() + 15
    while True:
        server.app.state.audit.flush()  # type: ignore[attr-defined]
        found = server.get("/fhir/AuditEvent", params={
            "entity": f"Subscription/{subscription_id}", "_sort": "date", "_count": 50}).json()
        events = [e["resource"] for e in found["entry"]
                  if e["resource"]["type"]["code"] == "110106"]  # not the client's requests
        kinds = [(e["subtype"][0]["code"], e["outcome"]) for e in events]
        if kinds and kinds[-1][0] == "event-notification" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert kinds[0] == ("handshake", "8")
    assert ("handshake", "0") in kinds
    assert kinds[-1] == ("event-notification", "0")
    sent = events[-1]
    assert sent["type"]["code"] == "110106"  # Export
    by_type = server.get("/fhir/AuditEvent", params={"type": "110106", "_count": 50}).json()
    assert len(by_type["entry"]) == len(events)
    assert any(a.get("network", {}).get("address") == "127.0.0.1" for a in sent["agent"])
    assert any(e["what"]["reference"].startswith("Task/") for e in sent["entity"])


def test_a_transaction_open_across_a_gap_loses_no_event(
        server: TestClient, receiver: Receiver, settings: Settings) -> None:
    """PostgreSQL numbers a change before it commits: matching waits at the gap while
    that transaction is open, however long, and numbers its change when it commits."""
    if settings.is_sqlite:
        pytest.skip("SQLite commits changes in their order: no gap is ever open")
    from gateway.store.database import Database, make_engine
    from gateway.store.repository import Repository

    subscribe(server, subscription(receiver.url()))
    receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
    db = Database(make_engine(settings))
    try:
        with db.write() as conn:  # stays open while a later change commits
            Repository(conn).create(task(description="slow"))
            create(server, task(description="quick"))
            time.sleep(1.0)
            assert receiver.event_numbers() == []  # the quick one waits behind the gap
        receiver.wait_for(lambda r: len(r.event_numbers()) == 2)
        with pytest.raises(RuntimeError), db.write() as conn:  # a gap rolled back
            Repository(conn).create(task(description="undone"))
            raise RuntimeError
        create(server, task(description="after"))
        receiver.wait_for(lambda r: len(r.event_numbers()) == 3)
    finally:
        db.dispose()
    assert receiver.event_numbers() == [1, 2, 3]


def test_matching_started_while_a_subscription_is_being_written_serves_it(
        settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Matching's first start places its cursor: a Subscription written in a transaction
    still open then, numbered before a change that has committed, is not passed over.
    The clock margin is narrowed so that the committed change is older than it: the
    open transaction alone must hold the cursor back."""
    if settings.is_sqlite:
        pytest.skip("SQLite commits changes in their order: no gap is ever open")
    from gateway.store import database
    from gateway.store.database import make_engine
    from gateway.store.repository import Repository
    from gateway.store.schema import subscriptions
    from gateway.subscriptions.matcher import Matcher

    writer = Database(make_engine(settings))
    matcher = Matcher(db, settings.model_copy(update=subscription_settings(settings)))
    try:
        with writer.write() as conn:  # stays open while a later change commits
            written = Repository(conn).create(subscription("http://127.0.0.1:9/hook"))
            with db.write() as other:
                Repository(other).create(task(description="committed first"))
            monkeypatch.setattr(database, "CLOCK_MARGIN_MICROS", 200_000)
            time.sleep(0.5)
            matcher.run_once()  # the first round: the cursor is placed
        matcher.run_once()
        with db.read() as conn:
            rows = conn.execute(select(subscriptions.c.id, subscriptions.c.status)).all()
    finally:
        matcher.close()
        writer.dispose()
    assert [tuple(row) for row in rows] == [(written.id, "requested")]
