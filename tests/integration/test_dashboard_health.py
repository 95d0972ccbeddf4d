"""The operations-health panels of the dashboard (gateway/dashboard/health/), on SQLite
and PostgreSQL, over data made through the FHIR API as partners make it: custody
exceptions and excursions, slot and quota use per site, subscription delivery health
(with real failing endpoints on 127.0.0.1). Figures are checked against hand-counted
values, and each viewer sees only what is theirs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from gateway.custody import coi
from gateway.dashboard.health import (
    CustodyExceptions,
    SiteUse,
    SubscriptionHealth,
    custody_exceptions,
    slot_use,
    subscription_health,
)
from gateway.scheduling.slots import Claim, take
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from gateway.store.timeparse import micros_of
from mappings import isbt128
from orchestration.state import KEY_SYSTEM
from tests.conftest import client_with, free_port
from tests.integration.auth_support import bearer
from tests.integration.custody_support import FHIR, Enrolment, enrol, post, put
from tests.integration.scheduling_support import Network, quota
from tests.integration.subscription_support import (
    receiving,
    subscription,
    subscription_settings,
    task,
)

T = TypeVar("T")
CENTRE_A, CENTRE_B = "Organization/centre", "Organization/centre-b"
TEMPERATURE = {"system": "https://atm-gateway.org/fhir/CodeSystem/custody-observation",
               "code": "shipment-temperature"}


@dataclass(frozen=True)
class Viewer:
    role: str
    organization: str


ADMIN = Viewer("admin", "Organization/ops")


def eventually(read: Callable[[], T], done: Callable[[T], bool], seconds: float = 15) -> T:
    """Read until `done` holds (background delivery), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not done(value := read()):
        assert time.monotonic() < deadline, f"still {value!r}"
        time.sleep(0.05)
    return value


# -- custody exceptions and excursions ------------------------------------------------------
@pytest.fixture
def server(settings: Settings) -> Iterator[TestClient]:
    with client_with(settings, load_protocols=True) as client:
        yield client


@dataclass
class Custody:
    first: Enrolment
    second: Enrolment
    products: tuple[dict[str, Any], dict[str, Any]]
    held_task: dict[str, Any]
    raised: dict[str, str]  # name -> what raised it (Observation/… or Task/…)


def excursion(enrolment: Enrolment, product: dict[str, Any], performer: str) -> str:
    """A data-logger reading of -120 Cel for a product kept at -196 to -135 Cel."""
    reading = post(enrolment.client, {
        "resourceType": "Observation", "status": "final", "code": {"coding": [TEMPERATURE]},
        "focus": [{"reference": f"BiologicallyDerivedProduct/{product['id']}"}],
        "performer": [{"reference": performer}],
        "valueQuantity": {"value": -120, "unit": "Cel", "code": "Cel"}})
    return f"Observation/{reading['id']}"


def wrong_scan(enrolment: Enrolment, product: dict[str, Any]) -> dict[str, Any]:
    """A pick-up whose scanned code is another enrolment's: the step is stopped."""
    stage = "shipment-to-manufacturer"
    enrolment.tasks[stage] = post(enrolment.client, {
        "resourceType": "Task", "status": "in-progress", "intent": "order",
        "identifier": [{"system": KEY_SYSTEM, "value": f"{enrolment.careplan['id']}/{stage}/1"}],
        "basedOn": [{"reference": f"CarePlan/{enrolment.careplan['id']}"}],
        "for": {"reference": f"Patient/{enrolment.patient['id']}"},
        "focus": {"reference": f"BiologicallyDerivedProduct/{product['id']}"},
        "owner": {"reference": enrolment.parties["courier"].organization}})
    parsed = isbt128.parse(enrolment.code)
    other = isbt128.make(parsed.facility, parsed.year, parsed.sequence + 7).eye_readable
    provenance = enrolment.handoff("pick-up", product, enrolment.tasks[stage],
                                   releasing="apheresis", receiving="courier", scanned=other,
                                   signers=[("apheresis", "released"), ("courier", "received")])
    response = enrolment.client.post("/fhir/Provenance", json=provenance, headers=FHIR)
    assert response.status_code == 422, response.text
    return enrolment.tasks[stage]


@pytest.fixture
def custody(server: TestClient, db: Database, settings: Settings) -> Custody:
    """Centre A's patient: an excursion read by the courier, then a wrong scan at
    pick-up; centre B's patient: an excursion read by another courier, its product the
    focus of a manufacturer's Task. Also an overdue-style Flag, which is no custody
    problem."""
    first, second = enrol(server, db, settings), enrol(server, db, settings)
    put(server, {"resourceType": "Organization", "id": "centre-b", "name": "Centre B"})
    put(server, {**second.read(f"Patient/{second.patient['id']}"),
                 "managingOrganization": {"reference": CENTRE_B}})
    products = (first.product(), second.product())
    raised = {"first-excursion": excursion(first, products[0], "Organization/courier")}
    held = wrong_scan(first, products[0])
    raised["wrong-scan"] = f"Task/{held['id']}"
    post(server, {"resourceType": "Task", "status": "ready", "intent": "order",
                  "owner": {"reference": "Organization/manufacturer"},
                  "focus": {"reference": f"BiologicallyDerivedProduct/{products[1]['id']}"}})
    raised["second-excursion"] = excursion(second, products[1], "Organization/courier-b")
    post(server, {"resourceType": "Flag", "status": "active",
                  "subject": {"reference": f"Patient/{first.patient['id']}"},
                  "period": {"start": datetime.now(UTC).isoformat()},
                  "category": [{"coding": [{"code": "admin"}]}], "code": {"text": "Overdue"},
                  "extension": [{"url": "https://atm-gateway.org/fhir/StructureDefinition/"
                                        "flag-about",
                                 "valueReference": {"reference": raised["wrong-scan"]}}]})
    return Custody(first, second, products, held, raised)


def today_for(db: Database, viewer: Viewer, limit: int = 50) -> CustodyExceptions:
    today = datetime.now(UTC).date()
    return custody_exceptions(db, viewer, today - timedelta(days=1), today, limit)


def test_admin_sees_every_custody_problem_newest_first_described(
        custody: Custody, db: Database) -> None:
    found = today_for(db, ADMIN)
    assert found.total == 3 and found.more == 0
    assert [(e.kind, e.about) for e in found.items] == [
        ("excursion", custody.raised["second-excursion"]),
        ("custody", custody.raised["wrong-scan"]),
        ("excursion", custody.raised["first-excursion"])]
    assert [e.at for e in found.items] == sorted((e.at for e in found.items), reverse=True)
    second, scan, first = found.items
    product = f"BiologicallyDerivedProduct/{custody.products[0]['id']}"
    assert first.product == scan.product == product
    assert first.careplan == scan.careplan == f"CarePlan/{custody.first.careplan['id']}"
    assert first.patient == scan.patient == f"Patient/{custody.first.patient['id']}"
    assert first.coi == scan.coi == coi.eye_readable(custody.first.code)
    assert second.careplan == f"CarePlan/{custody.second.careplan['id']}"
    assert second.coi == coi.eye_readable(custody.second.code)
    assert "-120 Cel" in first.text and "-196 to -135 Cel" in first.text
    assert scan.text.startswith("Chain of identity: chain of identity mismatch")
    assert first.status == scan.status == "active"
    assert first.flag.startswith("Flag/") and first.flag != scan.flag


def test_the_list_is_capped_with_the_total_and_bounded_by_dates(
        custody: Custody, db: Database) -> None:
    capped = today_for(db, ADMIN, limit=1)
    assert capped.total == 3 and capped.more == 2
    assert [e.about for e in capped.items] == [custody.raised["second-excursion"]]
    long_ago = datetime.now(UTC).date() - timedelta(days=30)
    assert custody_exceptions(db, ADMIN, long_ago, long_ago + timedelta(days=7)).total == 0


def test_a_treatment_centre_sees_only_its_own_patients_problems(
        custody: Custody, db: Database) -> None:
    mine = today_for(db, Viewer("treatment-centre", CENTRE_A))
    assert {e.about for e in mine.items} == {custody.raised["first-excursion"],
                                             custody.raised["wrong-scan"]}
    theirs = today_for(db, Viewer("treatment-centre", CENTRE_B))
    assert [e.about for e in theirs.items] == [custody.raised["second-excursion"]]
    assert theirs.total == 1
    assert today_for(db, Viewer("treatment-centre", "Organization/nobody")).total == 0


def test_partners_see_what_they_own_perform_or_handle_without_the_patient(
        custody: Custody, db: Database) -> None:
    courier = today_for(db, Viewer("courier", "Organization/courier"))
    # Its own custody Task, and the reading it performed; not the other courier's.
    assert {e.about for e in courier.items} == {custody.raised["first-excursion"],
                                                custody.raised["wrong-scan"]}
    assert all(e.patient is None for e in courier.items)
    assert all(e.coi == coi.eye_readable(custody.first.code) for e in courier.items)
    other = today_for(db, Viewer("courier", "Organization/courier-b"))
    assert [e.about for e in other.items] == [custody.raised["second-excursion"]]
    # A manufacturer sees the excursion of a product one of its Tasks is about.
    maker = today_for(db, Viewer("manufacturer", "Organization/manufacturer"))
    assert [e.about for e in maker.items] == [custody.raised["second-excursion"]]
    assert maker.items[0].patient == f"Patient/{custody.second.patient['id']}"
    assert today_for(db, Viewer("payer", "Organization/payer")).total == 0
    assert today_for(db, Viewer("unknown-role", "Organization/courier")).total == 0


# -- slot and quota use -------------------------------------------------------------------------
MONDAY = datetime(2030, 7, 1, tzinfo=UTC)  # the first of a month, a Monday: hand-countable
WEEK_ONE = (date(2030, 7, 1), date(2030, 7, 7))


def book(client: TestClient, slot: str, centre: str) -> None:
    """An appointment in `slot` for a new patient of `centre` (its enrolment's author)."""
    patient = post(client, {"resourceType": "Patient", "name": [{"family": "Booked"}],
                            "managingOrganization": {"reference": centre}})
    careplan = post(client, {"resourceType": "CarePlan", "status": "active", "intent": "plan",
                             "subject": {"reference": f"Patient/{patient['id']}"},
                             "author": {"reference": centre}})
    post(client, {"resourceType": "Appointment", "status": "booked",
                  "slot": [{"reference": slot}],
                  "supportingInformation": [{"reference": f"CarePlan/{careplan['id']}"}],
                  "participant": [{"actor": {"reference": f"Patient/{patient['id']}"},
                                   "status": "accepted"}]})


def relative(locations: list[str]) -> list[str]:
    """Slot/<id> of each absolute location a transaction answered."""
    return ["/".join(location.split("/")[-2:]) for location in locations]


@pytest.fixture
def sites(client: TestClient, db: Database, monkeypatch: pytest.MonkeyPatch) -> Network:
    """An apheresis site (7 daily slots of 2 places from Monday 1 July 2030) and a
    manufacturer (14 daily slots of 1, the last closed), with a weekly quota of 2 for
    centre A and a shared monthly quota of 5. Booked: apheresis 3 (days 0, 0, 1) and one
    place held on day 3; manufacturing days 0 and 1 for centre A, 2 and 7 for centre B."""
    monkeypatch.setattr("tests.integration.scheduling_support.MONDAY", MONDAY)
    network = Network(client, canonical="")
    put(client, {"resourceType": "Organization", "id": "aph-a", "name": "Apheresis A"})
    put(client, {"resourceType": "Organization", "id": "mfg", "name": "Cell factory"})
    network.site("aph-a")
    network.site("mfg", quota=quota(2, "week", CENTRE_A))
    service = client.get("/fhir/HealthcareService/mfg").json()
    put(client, {**service, "extension": [*service["extension"], quota(5, "month")]})
    apheresis = relative(network.slots("aph-a", range(7), capacity=2))
    manufacturing = relative(network.slots("mfg", range(14), hour=8, hours=8))
    closed = client.get(f"/fhir/{manufacturing[13]}").json()
    put(client, {**closed, "status": "busy-unavailable"})
    for slot, centre in ((apheresis[0], CENTRE_A), (apheresis[0], CENTRE_A),
                         (apheresis[1], CENTRE_B), (manufacturing[0], CENTRE_A),
                         (manufacturing[1], CENTRE_A), (manufacturing[2], CENTRE_B),
                         (manufacturing[7], CENTRE_B)):
        book(client, slot, centre)
    with db.write() as conn:
        start = micros_of(MONDAY + timedelta(days=3, hours=9))
        take(Repository(conn), Claim(start, start + 4 * 3_600_000_000,
                                     slot_id=apheresis[3].split("/")[1], hold_id="h1",
                                     expires=micros_of(datetime.now(UTC)) + 600_000_000))
    return network


def by_kind(found: list[SiteUse]) -> dict[str, SiteUse]:
    return {s.kind: s for s in found}


def quota_lines(site: SiteUse) -> list[tuple[str, date, int, int, str | None]]:
    return [(q.period, q.period_start, q.limit, q.used, q.organization) for q in site.quotas]


def test_slot_use_per_site_and_kind_in_the_first_week(sites: Network, db: Database) -> None:
    found = slot_use(db, ADMIN, *WEEK_ONE)
    assert [s.kind for s in found] == ["apheresis", "manufacturing"]
    apheresis, manufacturing = found
    assert (apheresis.organization, apheresis.name, apheresis.services) == (
        "Organization/aph-a", "Apheresis A", ("HealthcareService/aph-a",))
    assert (apheresis.slots, apheresis.closed, apheresis.capacity, apheresis.booked,
            apheresis.held, apheresis.utilisation) == (7, 0, 14, 3, 1, 21.4)
    assert apheresis.quotas == ()
    assert (manufacturing.name, manufacturing.slots, manufacturing.closed,
            manufacturing.capacity, manufacturing.booked, manufacturing.held,
            manufacturing.utilisation) == ("Cell factory", 7, 0, 7, 3, 0, 42.9)
    assert quota_lines(manufacturing) == [("week", date(2030, 7, 1), 2, 2, CENTRE_A),
                                          ("month", date(2030, 7, 1), 5, 4, None)]
    assert manufacturing.quotas[0].full and not manufacturing.quotas[1].full


def test_slot_use_over_two_weeks_counts_the_closed_slot_apart(
        sites: Network, db: Database) -> None:
    manufacturing = by_kind(slot_use(db, ADMIN, date(2030, 7, 1), date(2030, 7, 14))
                            )["manufacturing"]
    assert (manufacturing.slots, manufacturing.closed, manufacturing.capacity,
            manufacturing.booked, manufacturing.utilisation) == (13, 1, 13, 4, 30.8)
    assert quota_lines(manufacturing) == [("week", date(2030, 7, 1), 2, 2, CENTRE_A),
                                          ("week", date(2030, 7, 8), 2, 0, CENTRE_A),
                                          ("month", date(2030, 7, 1), 5, 4, None)]
    empty = by_kind(slot_use(db, ADMIN, date(2030, 9, 1), date(2030, 9, 7)))["apheresis"]
    assert (empty.slots, empty.capacity, empty.booked, empty.utilisation) == (0, 0, 0, None)


def test_a_centres_quota_is_shown_to_that_centre_only(sites: Network, db: Database) -> None:
    for viewer, centre_quota in ((Viewer("treatment-centre", CENTRE_A), True),
                                 (Viewer("treatment-centre", CENTRE_B), False),
                                 (Viewer("courier", "Organization/courier"), False),
                                 (Viewer("ehr", "Organization/hospital"), True)):
        manufacturing = by_kind(slot_use(db, viewer, *WEEK_ONE))["manufacturing"]
        assert (manufacturing.capacity, manufacturing.booked) == (7, 3)  # sites: everyone
        expected: list[tuple[str, date, int, int, str | None]] = [
            ("month", date(2030, 7, 1), 5, 4, None)]
        if centre_quota:
            expected.insert(0, ("week", date(2030, 7, 1), 2, 2, CENTRE_A))
        assert quota_lines(manufacturing) == expected, viewer


# -- subscription delivery health ------------------------------------------------------------
@dataclass
class Subscribed:
    ok: str
    failing: str
    unreachable: str
    socket: str
    port: int


@pytest.fixture
def subscribed(settings: Settings, db: Database) -> Iterator[Subscribed]:
    """LIMS A's endpoint answers 200; LIMS B has one answering 500 and one on a closed
    port; LIMS A also follows a websocket (bound by nobody). One Task for each LIMS makes
    one event for each of their Subscriptions."""
    with client_with(settings, auth="smart", rate_limit_per_second=0,
                     **subscription_settings(settings)) as server, \
            receiving() as fine, receiving(answer=500) as broken:
        admin = bearer(server, db, "admin", "Organization/ops")
        lims_a = bearer(server, db, "lims", "Organization/lims-a")
        lims_b = bearer(server, db, "lims", "Organization/lims-b")
        closed = free_port()
        made = []
        for who, endpoint in ((lims_a, fine.url()),
                              (lims_b, broken.url("/hook") + "?token=query-secret"),
                              (lims_b, f"http://127.0.0.1:{closed}/hook")):
            body = subscription(endpoint, headers=("Authorization: Bearer header-secret",))
            response = server.post("/fhir/Subscription", json=body, headers=who)
            assert response.status_code == 201, response.text
            made.append(response.json()["id"])
        socket = server.post("/fhir/Subscription", json=subscription("", channel="websocket"),
                             headers=lims_a)
        assert socket.status_code == 201, socket.text
        for owner in ("Organization/lims-a", "Organization/lims-b"):
            assert server.post("/fhir/Task", json=task(owner), headers=admin).status_code == 201
        fine.wait_for(lambda r: r.event_numbers() == [1])
        eventually(lambda: health_by_id(db, ADMIN), lambda found: all(
            found[i].status == "error" and found[i].lag == 1 and found[i].last_error_at
            for i in made[1:]) and found[made[0]].lag == 0
            and found[socket.json()["id"]].events == 1)
        yield Subscribed(made[0], made[1], made[2], socket.json()["id"], closed)


def health_by_id(db: Database, viewer: Viewer, **options: Any) -> dict[str, SubscriptionHealth]:
    return {h.id: h for h in subscription_health(db, viewer, **options)}


def test_healthy_and_failing_subscriptions_with_their_lag(
        subscribed: Subscribed, db: Database) -> None:
    listed = subscription_health(db, ADMIN)
    assert [h.failing for h in listed] == [True, True, False, False]  # trouble first
    found = {h.id: h for h in listed}
    ok, failing, unreachable = (found[subscribed.ok], found[subscribed.failing],
                                found[subscribed.unreachable])
    assert (ok.status, ok.organization, ok.events, ok.lag, ok.oldest_undelivered,
            ok.failures, ok.last_error, ok.failing, ok.lagging) == (
        "active", "Organization/lims-a", 1, 0, None, 0, None, False, False)
    assert ok.topic.endswith("/task-status") and ok.channel == "rest-hook"
    for bad in (failing, unreachable):
        assert (bad.status, bad.organization, bad.events, bad.lag) == (
            "error", "Organization/lims-b", 1, 1)
        assert bad.failing and bad.failures >= 1 and not bad.lagging  # a fresh event
        assert bad.oldest_undelivered is not None and bad.last_error_at is not None
        assert datetime.now(UTC) - bad.last_error_at < timedelta(minutes=1)
        assert bad.lag_age is not None and bad.lag_age < timedelta(minutes=1)
    assert failing.last_error == "the endpoint answered HTTP 500"
    assert unreachable.last_error and "Connect" in unreachable.last_error
    assert unreachable.endpoint == f"http://127.0.0.1:{subscribed.port}/hook"


def test_lagging_is_the_oldest_undelivered_event_against_the_threshold(
        subscribed: Subscribed, db: Database) -> None:
    later = datetime.now(UTC) + timedelta(minutes=10)
    found = health_by_id(db, ADMIN, now=later)
    assert found[subscribed.failing].lagging and found[subscribed.unreachable].lagging
    assert found[subscribed.failing].lag_age > timedelta(minutes=10)  # type: ignore[operator]
    assert not found[subscribed.ok].lagging  # nothing waits
    # A websocket acknowledges nothing: no lag can be told.
    assert (found[subscribed.socket].lag, found[subscribed.socket].lagging) == (0, False)
    assert found[subscribed.socket].endpoint is None
    relaxed = health_by_id(db, ADMIN, now=later, lag_threshold=timedelta(hours=1))
    assert not any(h.lagging for h in relaxed.values())


def test_no_secret_of_the_channel_is_shown(subscribed: Subscribed, db: Database) -> None:
    found = health_by_id(db, ADMIN)
    endpoint = found[subscribed.failing].endpoint
    assert endpoint is not None and endpoint.startswith("http://127.0.0.1:")
    assert endpoint.endswith("/hook")
    assert "secret" not in repr(found)


def test_each_partner_sees_only_its_own_subscriptions(
        subscribed: Subscribed, db: Database) -> None:
    assert set(health_by_id(db, Viewer("lims", "Organization/lims-a"))) == {
        subscribed.ok, subscribed.socket}
    assert set(health_by_id(db, Viewer("lims", "Organization/lims-b"))) == {
        subscribed.failing, subscribed.unreachable}
    assert health_by_id(db, Viewer("treatment-centre", CENTRE_A)) == {}
    assert len(health_by_id(db, Viewer("ehr", "Organization/hospital"))) == 4
