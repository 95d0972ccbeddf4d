"""Multi-step scheduling over HTTP, on SQLite and PostgreSQL: $find-chain, $hold-chain,
$book-chain (with and without published slots), capacity, quotas, routes, $reschedule,
cancellation, a manufacturing delay, and what the orchestrator's booking Task becomes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.custody import coi
from gateway.scheduling.operations import CHAIN_STEP, OVERRIDE
from gateway.scheduling.replan import EXPECTED_RELEASE
from gateway.services.context import Context
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from orchestration.state import KEY_SYSTEM
from tests.conftest import client_with
from tests.integration.auth_support import bearer
from tests.integration.scheduling_support import (
    DAY,
    FHIR,
    MONDAY,
    Network,
    build,
    instant,
    params,
    part,
    post,
    quota,
    slot_parameters,
    steps_of,
)
from tests.integration.subscription_support import (
    receiving,
    subscription,
    subscription_settings,
)


@pytest.fixture
def server(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, load_protocols=True) as client:
        yield client


@pytest.fixture
def network(server: TestClient) -> Network:
    return build(server)


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def book(network: Network, careplan: dict[str, Any], body: dict[str, Any],
         status: int = 200) -> dict[str, Any]:
    response = network.client.post(f"/fhir/CarePlan/{careplan['id']}/$book-chain", json=body,
                                   headers=FHIR)
    assert response.status_code == status, response.text
    return dict(response.json())


def read(network: Network, reference: str) -> dict[str, Any]:
    response = network.client.get(f"/fhir/{reference}")
    assert response.status_code == 200, response.text
    return dict(response.json())


# -- finding ------------------------------------------------------------------------------
def test_find_chain_ranks_chains_that_keep_the_protocols_lead_times(network: Network) -> None:
    careplan = network.enrol()
    chains = network.chains(careplan)
    assert len(chains) == 5
    infusions = []
    for chain in chains:
        steps = steps_of(chain)
        assert list(steps) == ["apheresis", "manufacturing", "infusion"]
        aph, mfg, inf = (when(steps[s]["start"]) for s in steps)
        assert 2 * DAY <= mfg - aph <= 7 * DAY
        assert 28 * DAY <= inf - mfg <= 42 * DAY
        infusions.append(inf)
    assert infusions == sorted(infusions)
    first = steps_of(chains[0])
    assert when(first["apheresis"]["start"]) == MONDAY + timedelta(hours=9)
    assert first["manufacturing"]["service"] == "HealthcareService/mfg"


def test_type_level_find_chain_takes_a_protocol_and_a_patient(network: Network) -> None:
    patient = post(network.client, {"resourceType": "Patient"})
    response = network.client.get("/fhir/CarePlan/$find-chain", params={
        "protocol": network.canonical, "patient": f"Patient/{patient['id']}",
        "start": instant(MONDAY), "count": "2", "priority": "urgent"})
    assert response.status_code == 200, response.text
    chains = params(response.json())["chain"]
    assert len(chains) == 2
    steps = steps_of(chains[0])
    # Urgent: manufacturing 1–3 days after apheresis instead of 2–7.
    assert when(steps["manufacturing"]["start"]) - when(steps["apheresis"]["start"]) < 2 * DAY


def test_no_chain_says_why(network: Network) -> None:
    careplan = network.enrol()
    found = network.find(careplan, start=instant(MONDAY + 20 * DAY))
    assert "chain" not in params(found)
    issues = params(found)["outcome"][0]["resource"]["issue"]
    assert "no open apheresis slot" in issues[0]["diagnostics"]


BAD_FIND = [({"priority": "whenever"}, "priority is one of"),
            ({"count": "0"}, "count must be a whole number"),
            ({"start": "next week"}, "start must be a date"),
            ({"end": "2020-01-01"}, "end must follow start")]


def test_bad_find_parameters_are_400(network: Network) -> None:
    careplan = network.enrol()
    for query, message in BAD_FIND:  # one network for all: building it is the slow part
        response = network.client.get(f"/fhir/CarePlan/{careplan['id']}/$find-chain",
                                      params={"start": instant(MONDAY), **query})
        assert response.status_code == 400, query
        assert message in response.json()["issue"][0]["diagnostics"]


def test_find_chain_of_unknown_things(network: Network) -> None:
    assert network.client.get("/fhir/CarePlan/nope/$find-chain").status_code == 404
    response = network.client.get("/fhir/CarePlan/$find-chain",
                                  params={"protocol": "http://example.org/none"})
    assert response.status_code == 404
    plain = post(network.client, {"resourceType": "CarePlan", "status": "active",
                                  "intent": "plan", "subject": {"reference": "Patient/x"}})
    response = network.client.get(f"/fhir/CarePlan/{plain['id']}/$find-chain")
    assert response.status_code == 422
    assert "follows no protocol" in response.json()["issue"][0]["diagnostics"]


# -- routes and quotas -------------------------------------------------------------------------
def test_routes_are_tried_by_priority(network: Network) -> None:
    network.route(1, ["aph-b", "mfg", "inf-b"], centre="Organization/centre")
    network.route(2, ["aph-a", "mfg", "inf-a"], centre="Organization/centre")
    network.route(1, ["aph-a", "mfg", "inf-a"], centre="Organization/elsewhere")
    careplan = network.enrol()
    for chain in network.chains(careplan):
        assert {s["service"] for s in steps_of(chain).values()} == {
            "HealthcareService/aph-b", "HealthcareService/mfg", "HealthcareService/inf-b"}
        assert part(chain, "priority") == 1
    # Priority 1's apheresis site closes: priority 2's sites are offered.
    for slot_id in network.client.get("/fhir/Slot", params={
            "schedule": network.schedules["aph-b"], "_count": "100"}).json()["entry"]:
        slot = slot_id["resource"]
        network.client.put(f"/fhir/Slot/{slot['id']}", headers=FHIR,
                           json={**slot, "status": "busy-unavailable"})
    chains = network.chains(careplan)
    assert chains and all(part(c, "priority") == 2 for c in chains)
    assert steps_of(chains[0])["apheresis"]["service"] == "HealthcareService/aph-a"


def test_a_manufacturer_quota_per_week_and_centre(server: TestClient) -> None:
    network = build(server, mfg_capacity=5, mfg_quota=quota(1, "week", "Organization/centre"))
    first, second = network.enrol("First"), network.enrol("Second")
    chain = network.chains(first, count="1")[0]
    book(network, first, slot_parameters(chain))
    booked_week = when(steps_of(chain)["manufacturing"]["start"])
    for offered in network.chains(second, count="10"):
        start = when(steps_of(offered)["manufacturing"]["start"])
        assert start.isocalendar()[:2] != booked_week.isocalendar()[:2]


def test_bad_quota_is_refused(network: Network) -> None:
    response = network.client.put("/fhir/HealthcareService/mfg", headers=FHIR, json={
        "resourceType": "HealthcareService", "id": "mfg",
        "extension": [quota(1, "fortnight")]})
    assert response.status_code == 422
    assert "booking-quota" in response.json()["issue"][0]["diagnostics"]


# -- holding and booking ---------------------------------------------------------------------
def test_hold_then_book_in_one_transaction(network: Network) -> None:
    careplan, other = network.enrol("First"), network.enrol("Second")
    chain = network.chains(careplan, count="1")[0]
    slots = {s["slot"] for s in steps_of(chain).values()}
    response = network.client.post(f"/fhir/CarePlan/{careplan['id']}/$hold-chain",
                                   json=slot_parameters(chain), headers=FHIR)
    assert response.status_code == 200, response.text
    hold = params(response.json())["hold"][0]["valueString"]
    # Held: another patient is not offered those slots.
    for offered in network.chains(other):
        assert not slots & {s["slot"] for s in steps_of(offered).values()}
    booked = book(network, careplan, {"resourceType": "Parameters", "parameter": [
        {"name": "hold", "valueString": hold}]})
    appointments = [read(network, part(a, "appointment")["reference"])
                    for a in params(booked)["appointment"]]
    assert [a["status"] for a in appointments] == ["booked"] * 3
    assert [e["valueId"] for a in appointments for e in a["extension"]
            if e["url"] == CHAIN_STEP] == ["apheresis", "manufacturing", "infusion"]
    assert {a["slot"][0]["reference"] for a in appointments} == slots
    for slot in slots:
        assert read(network, slot)["status"] == "busy"
    # The booking step of the enrolment is done, and names what it booked.
    task = read(network, params(booked)["task"][0]["valueReference"]["reference"])
    assert task["status"] == "completed"
    assert len(task["output"]) == 3
    # A used hold is gone.
    again = book(network, careplan, {"resourceType": "Parameters", "parameter": [
        {"name": "hold", "valueString": hold}]}, status=422)
    assert "is not a hold" in again["issue"][0]["diagnostics"]


def test_a_taken_slot_is_409_with_fresh_chains(network: Network) -> None:
    first, second = network.enrol("First"), network.enrol("Second")
    chain = network.chains(first, count="1")[0]
    book(network, first, slot_parameters(chain))
    outcome = book(network, second, slot_parameters(chain), status=409)
    assert "is full" in outcome["issue"][0]["diagnostics"]
    alternatives = outcome["contained"][0]
    assert alternatives["id"] == "alternatives"
    taken = {s["slot"] for s in steps_of(chain).values()}
    fresh = [c for c in alternatives["parameter"] if c["name"] == "chain"]
    assert fresh and all(not taken & {s["slot"] for s in steps_of(c).values()} for c in fresh)
    # Nothing of the refused booking was stored.
    listed = network.client.get("/fhir/Appointment", params={"_summary": "count"}).json()
    assert listed["total"] == 3


def test_a_chain_that_breaks_a_lead_time_is_refused(network: Network) -> None:
    careplan = network.enrol()
    chains = network.chains(careplan, count="2")
    steps = steps_of(chains[0])
    late = network.client.get("/fhir/Slot", params={
        "schedule": network.schedules["inf-a"], "start": f"ge{instant(MONDAY + 50 * DAY)}",
        "_count": "1"}).json()["entry"][0]["resource"]
    outcome = book(network, careplan, {"resourceType": "Parameters", "parameter": [
        {"name": "slot", "valueReference": {"reference": steps["apheresis"]["slot"]}},
        {"name": "slot", "valueReference": {"reference": steps["manufacturing"]["slot"]}},
        {"name": "slot", "valueReference": {"reference": f"Slot/{late['id']}"}}]}, status=422)
    assert "lead time is 28 d to 42 d" in outcome["issue"][0]["diagnostics"]
    outcome = book(network, careplan, {"resourceType": "Parameters", "parameter": [
        {"name": "slot", "valueReference": {"reference": steps["apheresis"]["slot"]}}]},
        status=400)
    assert "The chain has 3 steps" in outcome["issue"][0]["diagnostics"]


def test_booking_without_a_published_slot_records_why_and_who(network: Network) -> None:
    careplan = network.enrol()
    steps = steps_of(network.chains(careplan, count="1")[0])
    bedside = when(steps["infusion"]["start"]) + timedelta(hours=6)
    booked = book(network, careplan, {"resourceType": "Parameters", "parameter": [
        {"name": "slot", "valueReference": {"reference": steps["apheresis"]["slot"]}},
        {"name": "slot", "valueReference": {"reference": steps["manufacturing"]["slot"]}}
    ][:0] + [
        {"name": "step", "part": [{"name": "slot", "valueReference": {
            "reference": steps["apheresis"]["slot"]}}]},
        {"name": "step", "part": [{"name": "slot", "valueReference": {
            "reference": steps["manufacturing"]["slot"]}}]},
        {"name": "step", "part": [
            {"name": "service", "valueReference": {"reference": "HealthcareService/inf-a"}},
            {"name": "start", "valueDateTime": instant(bedside)},
            {"name": "end", "valueDateTime": instant(bedside + timedelta(hours=3))},
            {"name": "reason", "valueString": "Extra bed opened for a relapsing patient"}]}]})
    infusion = read(network, part(params(booked)["appointment"][2], "appointment")["reference"])
    assert "slot" not in infusion
    override = next(e for e in infusion["extension"] if e["url"] == OVERRIDE)
    assert {p["url"] for p in override["extension"]} == {"reason", "by"}
    missing = book(network, network.enrol("Other"), {"resourceType": "Parameters", "parameter": [
        {"name": "step", "part": [{"name": "service", "valueReference": {
            "reference": "HealthcareService/aph-a"}}]}] * 3}, status=400)
    assert "a reason" in missing["issue"][0]["diagnostics"]


def test_capacity_counts_every_way_of_booking(server: TestClient) -> None:
    network = build(server, mfg_capacity=2)
    careplans = [network.enrol(f"Patient{i}") for i in range(3)]
    chain = network.chains(careplans[0], count="1")[0]
    mfg = steps_of(chain)["manufacturing"]["slot"]
    book(network, careplans[0], slot_parameters(chain))
    assert read(network, mfg)["status"] == "free"  # one place of two is left
    # A plain POST of an Appointment takes the second place...
    appointment = post(server, {"resourceType": "Appointment", "status": "booked",
                                "slot": [{"reference": mfg}],
                                "participant": [{"actor": {"reference": "Patient/walk-in"},
                                                 "status": "accepted"}]})
    assert read(network, mfg)["status"] == "busy"
    # ...and a third, by any path, is refused.
    refused = post(server, {**appointment, "id": None}, status=409)
    assert "is full" in refused["issue"][0]["diagnostics"]
    # Cancelling frees the place again.
    response = server.patch(f"/fhir/Appointment/{appointment['id']}", headers={
        "content-type": "application/json-patch+json"},
        json=[{"op": "replace", "path": "/status", "value": "cancelled"}])
    assert response.status_code == 200, response.text
    assert read(network, mfg)["status"] == "free"
    assert server.delete(f"/fhir/Slot/{mfg.split('/')[1]}").status_code == 409


def test_the_patient_is_never_in_two_places(network: Network) -> None:
    careplan = network.enrol()
    chain = network.chains(careplan, count="1")[0]
    book(network, careplan, slot_parameters(chain))
    apheresis = steps_of(chain)["apheresis"]
    patient = read(network, f"CarePlan/{careplan['id']}")["subject"]["reference"]
    clash = post(network.client, {
        "resourceType": "Appointment", "status": "booked",
        "start": apheresis["start"], "end": instant(when(apheresis["start"]) + timedelta(hours=1)),
        "participant": [{"actor": {"reference": patient}, "status": "accepted"}]}, status=409)
    assert "already has Appointment/" in clash["issue"][0]["diagnostics"]


# -- rescheduling ------------------------------------------------------------------------------
def _booked(network: Network, careplan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    chain = network.chains(careplan, count="1")[0]
    booked = book(network, careplan, slot_parameters(chain))
    return {part(a, "stage"): read(network, part(a, "appointment")["reference"])
            for a in params(booked)["appointment"]}


def _later_slot(network: Network, site: str, after: datetime) -> str:
    found = network.client.get("/fhir/Slot", params={
        "schedule": network.schedules[site], "start": f"ge{instant(after)}",
        "status": "free", "_sort": "start", "_count": "1"}).json()
    return f"Slot/{found['entry'][0]['resource']['id']}"


def test_reschedule_proposes_then_moves_the_steps_downstream(network: Network) -> None:
    careplan = network.enrol()
    booked = _booked(network, careplan)
    old = {stage: a["slot"][0]["reference"] for stage, a in booked.items()}
    # Apheresis ten days later: manufacturing (2–7 d after) must move too.
    target = _later_slot(network, "aph-a", when(booked["apheresis"]["start"]) + 10 * DAY)
    url = f"/fhir/Appointment/{booked['apheresis']['id']}/$reschedule"
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "slot", "valueReference": {"reference": target}}]}
    response = network.client.post(url, json=body, headers=FHIR)
    assert response.status_code == 200, response.text
    moves = {part(m, "stage"): m for m in params(response.json())["move"]}
    assert params(response.json())["applied"][0]["valueBoolean"] is False
    assert {"apheresis", "manufacturing"} <= set(moves)
    assert read(network, f"Appointment/{booked['apheresis']['id']}")["slot"][0][
        "reference"] == old["apheresis"]  # a proposal changes nothing
    applied = network.client.post(url, headers=FHIR, json={**body, "parameter": [
        *body["parameter"], {"name": "apply", "valueBoolean": True}]})
    assert applied.status_code == 200, applied.text
    now = {stage: read(network, f"Appointment/{a['id']}") for stage, a in booked.items()}
    assert now["apheresis"]["slot"][0]["reference"] == target
    aph, mfg, inf = (when(now[s]["start"]) for s in ("apheresis", "manufacturing", "infusion"))
    assert 2 * DAY <= mfg - aph <= 7 * DAY and 28 * DAY <= inf - mfg <= 42 * DAY
    assert read(network, old["apheresis"])["status"] == "free"  # freed
    assert read(network, target)["status"] == "busy"


def test_reschedule_that_breaks_a_lead_time_upstream_is_409(network: Network) -> None:
    careplan = network.enrol()
    booked = _booked(network, careplan)
    target = _later_slot(network, "mfg", when(booked["apheresis"]["start"]) + 20 * DAY)
    response = network.client.post(
        f"/fhir/Appointment/{booked['manufacturing']['id']}/$reschedule", headers=FHIR,
        json={"resourceType": "Parameters", "parameter": [
            {"name": "slot", "valueReference": {"reference": target}},
            {"name": "apply", "valueBoolean": True}]})
    assert response.status_code == 409
    assert "lead time" in response.json()["issue"][0]["diagnostics"]


# -- a manufacturing delay -------------------------------------------------------------------
def test_a_manufacturing_delay_proposes_a_new_infusion_and_tells_the_team(
        network: Network) -> None:
    careplan = network.enrol()
    booked = _booked(network, careplan)
    end = when(booked["manufacturing"]["end"])
    task = post(network.client, {
        "resourceType": "Task", "status": "in-progress", "intent": "order",
        "identifier": [{"system": KEY_SYSTEM, "value": f"{careplan['id']}/manufacturing/1"}],
        "basedOn": [{"reference": f"CarePlan/{careplan['id']}"}]})
    late = {**task, "extension": [{"url": EXPECTED_RELEASE,
                                   "valueDateTime": instant(end + 12 * DAY)}]}
    response = network.client.put(f"/fhir/Task/{task['id']}", json=late, headers=FHIR)
    assert response.status_code == 200, response.text
    told = network.client.get("/fhir/Communication", params={
        "based-on": f"CarePlan/{careplan['id']}"}).json()["entry"]
    assert len(told) == 1
    text = told[0]["resource"]["payload"][0]["contentString"]
    assert "Manufacturing delay" in text and "infusion from" in text
    assert {"reference": "Organization/centre"} in told[0]["resource"]["recipient"]
    # Told once: the same expected release again is not news.
    network.client.put(f"/fhir/Task/{task['id']}", json={**late, "status": "in-progress",
                                                         "description": "noted"},
                       headers=FHIR)
    assert len(network.client.get("/fhir/Communication", params={
        "based-on": f"CarePlan/{careplan['id']}"}).json()["entry"]) == 1


# -- who sees what ----------------------------------------------------------------------------
def test_a_site_sees_the_appointments_booked_at_its_services(settings: Settings,
                                                               db: Database) -> None:
    with client_with(settings, load_protocols=True, auth="smart") as server:
        admin = bearer(server, db, "admin", "Organization/ops")
        server.headers.update(admin)
        network = build(server)
        careplan = network.enrol()
        appointments = _booked(network, careplan)
        manufacturer = bearer(server, db, "manufacturer", "Organization/mfg")
        listed = server.get("/fhir/Appointment", headers=manufacturer).json()
        assert [e["resource"]["id"] for e in listed.get("entry", [])] == [
            appointments["manufacturing"]["id"]]
        other = server.get(f"/fhir/Appointment/{appointments['apheresis']['id']}",
                           headers=manufacturer)
        assert other.status_code == 404
        # A partner that may not create appointments books nothing.
        courier = bearer(server, db, "courier", "Organization/courier")
        response = server.post(f"/fhir/CarePlan/{careplan['id']}/$book-chain", headers=courier,
                               json={"resourceType": "Parameters", "parameter": []})
        assert response.status_code == 403


def test_the_capability_statement_lists_the_scheduling_operations(server: TestClient) -> None:
    resources = {r["type"]: r for r in server.get("/fhir/metadata").json()["rest"][0]["resource"]}
    assert {"find-chain", "hold-chain", "book-chain"} <= {
        o["name"] for o in resources["CarePlan"]["operation"]}
    assert "reschedule" in {o["name"] for o in resources["Appointment"]["operation"]}


def test_cancel_chain_frees_every_slot(network: Network) -> None:
    careplan = network.enrol()
    booked = _booked(network, careplan)
    url = f"/fhir/CarePlan/{careplan['id']}/$cancel-chain"
    missing = network.client.post(url, json={"resourceType": "Parameters"}, headers=FHIR)
    assert missing.status_code == 400
    response = network.client.post(url, headers=FHIR, json={
        "resourceType": "Parameters",
        "parameter": [{"name": "reason", "valueString": "Patient withdrew consent"}]})
    assert response.status_code == 200, response.text
    for appointment in booked.values():
        now = read(network, f"Appointment/{appointment['id']}")
        assert now["status"] == "cancelled"
        assert now["cancelationReason"]["text"] == "Patient withdrew consent"
        assert read(network, appointment["slot"][0]["reference"])["status"] == "free"
    again = network.client.post(url, headers=FHIR, json={
        "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "x"}]})
    assert again.status_code == 404
    # The same chain can be booked again.
    _booked(network, careplan)


def test_a_delay_reported_on_the_product_reaches_subscribers(
        settings: Settings, db: Database) -> None:
    with receiving() as receiver, client_with(settings, **subscription_settings(settings),
                                              load_protocols=True) as server:
        network = build(server)
        careplan = network.enrol()
        booked = _booked(network, careplan)
        with db.write() as conn:
            code = coi.assign(Context(db=db, settings=settings,
                                      base_url="http://testserver/fhir"),
                              Repository(conn), careplan["id"])
        response = server.post("/fhir/Subscription", headers=FHIR, json=subscription(
            receiver.url(), "communication-sent", content="full-resource",
            filters=("Communication?recipient=Organization/centre",)))
        assert response.status_code == 201, response.text
        receiver.wait_for(lambda r: bool(r.of_kind("handshake")))
        product = post(server, {
            "resourceType": "BiologicallyDerivedProduct", "status": "available",
            "identifier": [{"system": coi.COI_SYSTEM, "value": code}]})
        end = when(booked["manufacturing"]["end"])
        response = server.put(f"/fhir/BiologicallyDerivedProduct/{product['id']}", headers=FHIR,
                              json={**product, "extension": [{
                                  "url": EXPECTED_RELEASE,
                                  "valueDateTime": instant(end + 9 * DAY)}]})
        assert response.status_code == 200, response.text
        receiver.wait_for(lambda r: bool(r.of_kind("event-notification")))
    sent = [e["resource"] for r in receiver.of_kind("event-notification")
            for e in r.bundle["entry"][1:] if e.get("resource")]
    assert len(sent) == 1
    assert "Manufacturing delay" in sent[0]["payload"][0]["contentString"]
    assert {"reference": f"BiologicallyDerivedProduct/{product['id']}"} in sent[0]["about"]


# -- slots and holds at their edges -------------------------------------------------------------
@pytest.mark.parametrize("change, status, message", [
    ({"schedule": {"reference": "Schedule/none"}}, 422, "must name a Schedule"),
    ({"end": "2020-01-01T00:00:00Z"}, 422, "Slot.start must be before Slot.end"),
    ({"start": "2027-01-01T09:00:00"}, 400, "Instant value"),  # an instant has a zone
    ({"extension": [{"url": "https://atm-gateway.org/fhir/StructureDefinition/slot-capacity",
                     "valueUnsignedInt": 0}]}, 422, "slot-capacity must be a whole number"),
])
def test_a_bad_slot_is_refused(network: Network, change: dict[str, Any], status: int,
                               message: str) -> None:
    slot = {"resourceType": "Slot", "schedule": {"reference": network.schedules["aph-a"]},
            "status": "free", "start": "2027-01-01T09:00:00Z", "end": "2027-01-01T10:00:00Z",
            **change}
    response = network.client.post("/fhir/Slot", json=slot, headers=FHIR)
    assert response.status_code == status
    assert message in response.json()["issue"][0]["diagnostics"]


def test_capacity_cannot_drop_below_what_is_booked(server: TestClient) -> None:
    network = build(server, mfg_capacity=3)
    for family in ("One", "Two"):
        careplan = network.enrol(family)
        book(network, careplan, slot_parameters(network.chains(careplan, count="1")[0]))
    slot_ref = read(network, "Appointment?_count=1&service-type=manufacturing")
    slot_id = slot_ref["entry"][0]["resource"]["slot"][0]["reference"]
    slot = read(network, slot_id)
    one = {**slot, "extension": [{"url": "https://atm-gateway.org/fhir/StructureDefinition/"
                                          "slot-capacity", "valueUnsignedInt": 1}]}
    response = server.put(f"/fhir/{slot_id}", json=one, headers=FHIR)
    assert response.status_code == 409
    assert "holds 2 appointments" in response.json()["issue"][0]["diagnostics"]
    # Closing it is allowed (the bookings stay), and nothing more can be booked in it.
    closed = server.put(f"/fhir/{slot_id}", json={**slot, "status": "busy-unavailable"},
                        headers=FHIR)
    assert closed.status_code == 200 and closed.json()["status"] == "busy-unavailable"


def test_a_stale_hold_books_nothing(network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    careplan = network.enrol()
    chain = network.chains(careplan, count="1")[0]
    response = network.client.post(f"/fhir/CarePlan/{careplan['id']}/$hold-chain",
                                   json={**slot_parameters(chain), "parameter": [
                                       *slot_parameters(chain)["parameter"],
                                       {"name": "minutes", "valueInteger": 1}]},
                                   headers=FHIR)
    assert response.status_code == 200, response.text
    hold = params(response.json())["hold"][0]["valueString"]
    expires = when(params(response.json())["expires"][0]["valueInstant"])
    assert timedelta(seconds=50) < expires - datetime.now(expires.tzinfo) <= timedelta(minutes=1)
    # A minute later (the server's clock moved on), the hold is gone: its slots are free.
    from gateway.scheduling import directory, operations, slots
    from gateway.store import timeparse

    later = timeparse.now_micros() + 61_000_000
    for module in (directory, operations, slots):
        monkeypatch.setattr(module, "now_micros", lambda: later)
    outcome = book(network, careplan, {"resourceType": "Parameters", "parameter": [
        {"name": "hold", "valueString": hold}]}, status=422)
    assert "has expired" in outcome["issue"][0]["diagnostics"]
    offered = {s["slot"] for c in network.chains(careplan) for s in steps_of(c).values()}
    assert {s["slot"] for s in steps_of(chain).values()} <= offered


def test_a_hold_is_of_published_slots_only(network: Network) -> None:
    careplan = network.enrol()
    response = network.client.post(
        f"/fhir/CarePlan/{careplan['id']}/$hold-chain", headers=FHIR,
        json={"resourceType": "Parameters", "parameter": [
            {"name": "slot", "valueReference": {"reference": "Slot/nowhere"}}] * 3})
    assert response.status_code == 422
    assert "is not a published Slot" in response.json()["issue"][0]["diagnostics"]
    assert network.client.get(f"/fhir/CarePlan/{careplan['id']}/$hold-chain").status_code == 405
    not_parameters = network.client.post(f"/fhir/CarePlan/{careplan['id']}/$book-chain",
                                         json={"resourceType": "Patient"}, headers=FHIR)
    assert not_parameters.status_code == 400


def test_reschedule_without_a_published_slot_and_outside_a_chain(network: Network) -> None:
    careplan = network.enrol()
    booked = _booked(network, careplan)
    infusion = when(booked["infusion"]["start"]) + timedelta(hours=5)
    response = network.client.post(
        f"/fhir/Appointment/{booked['infusion']['id']}/$reschedule", headers=FHIR,
        json={"resourceType": "Parameters", "parameter": [
            {"name": "service", "valueReference": {"reference": "HealthcareService/inf-b"}},
            {"name": "start", "valueDateTime": instant(infusion)},
            {"name": "end", "valueDateTime": instant(infusion + timedelta(hours=2))},
            {"name": "reason", "valueString": "Ward B took the patient in the evening"},
            {"name": "apply", "valueBoolean": True}]})
    assert response.status_code == 200, response.text
    moved = read(network, f"Appointment/{booked['infusion']['id']}")
    assert "slot" not in moved and moved["start"].startswith(instant(infusion)[:16])
    assert read(network, booked["infusion"]["slot"][0]["reference"])["status"] == "free"
    plain = post(network.client, {"resourceType": "Appointment", "status": "proposed",
                                  "participant": [{"status": "needs-action"}]})
    outside = network.client.post(f"/fhir/Appointment/{plain['id']}/$reschedule", headers=FHIR,
                                  json={"resourceType": "Parameters", "parameter": []})
    assert outside.status_code == 400
    assert "was not booked as part of a chain" in outside.json()["issue"][0]["diagnostics"]
