"""The programme view's read model (gateway/dashboard/board.py) and its figures
(programme.py), on SQLite and PostgreSQL, over journeys the real orchestrator advanced:
counts by status and stage, vein-to-vein figures against hand-computed values, overdue
Tasks and open escalations, the weekly trend, who sees which journey, filters, and
refreshes that follow the change log."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pytest

from gateway.dashboard.board import Board
from gateway.dashboard.journeys import Filters, Viewer
from gateway.dashboard.programme import Bin, Counts, Distribution, Programme, WeekPoint
from gateway.services.context import Context, FhirRequest
from gateway.services.router import handle
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from orchestration.runner import Orchestrator
from orchestration.state import ROLE_ASSIGNMENT, resource_id
from tests.factories.protocols import action, plan_definition

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday
NOW = T0 + timedelta(days=56)
CENTRE_A, CENTRE_B = "Organization/centre-a", "Organization/centre-b"
MAKER, APHERESIS = "Organization/cell-factory", "Organization/apheresis-north"
NAMES = {CENTRE_A: "Centre A", CENTRE_B: "Centre B", MAKER: "Cell Factory",
         APHERESIS: "Apheresis North"}
THERAPY = plan_definition(
    action("intake", role="coordinator", deadline_days=2),
    action("apheresis", "intake", role="apheresis-centre", deadline_days=5),
    action("manufacturing", "apheresis", role="manufacturer", deadline_days=30),
    action("infusion", "manufacturing", role="coordinator"),
    action("follow-up", ("infusion", 7), role="coordinator"),
    escalation="coordinator", plan_id="board-therapy")
OTHER = {**plan_definition(action("intake", role="coordinator"),
                           action("infusion", "intake", role="coordinator"),
                           plan_id="board-other"), "title": "Other therapy"}
ADMIN = Viewer("admin", "Organization/ops")
VEIN_TO_VEIN = {"a1": 10, "a2": 20, "a3": 30, "b1": 40}  # days, apheresis to infusion


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def instant(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class World:
    """Journeys made as in production: resources written through the gateway's own
    services, the orchestrator advancing each plan after every change."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.clock = db, Clock()
        self.ctx = Context(db=db, settings=settings, base_url=settings.base_url or "")
        self.orchestrator = Orchestrator(db, settings, clock=self.clock)
        self.ids: dict[str, str] = {}  # journey name -> CarePlan id

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = handle(self.ctx, FhirRequest(
            method, path, body=orjson.dumps(body) if body is not None else None,
            content_type="application/fhir+json"))
        assert response.status < 300, response.body
        return orjson.loads(response.body) if response.body else None

    def organizations(self) -> None:
        for ref, name in NAMES.items():
            self.call("PUT", ref, {"resourceType": "Organization", "id": ref.split("/")[1],
                                   "name": name})
        for plan in (THERAPY, OTHER):
            self.call("PUT", f"PlanDefinition/{plan['id']}", plan)

    def enrol(self, name: str, centre: str, *, at: datetime = T0,
              plan: dict[str, Any] = THERAPY) -> str:
        self.clock.now = at
        patient = self.call("POST", "Patient", {
            "resourceType": "Patient", "name": [{"given": [name.upper()], "family": "Doe"}],
            "managingOrganization": {"reference": centre}})
        careplan = self.call("POST", "CarePlan", {
            "resourceType": "CarePlan", "status": "active", "intent": "plan",
            "instantiatesCanonical": [plan["url"]], "period": {"start": instant(at)},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "author": {"reference": centre}, "extension": [
                _assigned("manufacturer", MAKER), _assigned("apheresis-centre", APHERESIS)]})
        self.orchestrator.run_once()
        self.ids[name] = careplan["id"]
        return str(careplan["id"])

    def task(self, name: str, stage: str) -> dict[str, Any]:
        task: dict[str, Any] = self.call(
            "GET", f"Task/{resource_id('Task', self.ids[name], stage, 1)}")
        return task

    def complete(self, name: str, stage: str, at: datetime, *, advance: bool = True) -> None:
        """The Task's owner completes it, saying when; the orchestrator then advances."""
        self.clock.now = at
        task = self.task(name, stage) | {"status": "completed", "executionPeriod": {
            "start": instant(at - timedelta(hours=1)), "end": instant(at)}}
        self.call("PUT", f"Task/{task['id']}", task)
        if advance:
            self.orchestrator.run_once()

    def infuse(self, name: str, centre: str, vein_to_vein: int) -> None:
        self.enrol(name, centre)
        self.complete(name, "intake", day(1))
        self.complete(name, "apheresis", day(2))
        self.complete(name, "manufacturing", day(1 + vein_to_vein))
        self.complete(name, "infusion", day(2 + vein_to_vein))

    def check_deadlines(self, at: datetime) -> None:
        self.clock.now = at
        self.orchestrator.check_deadlines()


def _assigned(role: str, organization: str) -> dict[str, Any]:
    return {"url": ROLE_ASSIGNMENT, "extension": [
        {"url": "role", "valueCode": role},
        {"url": "organization", "valueReference": {"reference": organization}}]}


@pytest.fixture
def world(db: Database, settings: Settings) -> World:
    """a1-a3 and b1 infused (vein-to-vein 10, 20, 30 and 40 days), a3 followed up to the
    end; a4 never past intake (overdue from day 2); a5 revoked on day 5; b2 in
    manufacturing (overdue from day 32); c1 in the other therapy, enrolled on day 45.
    The orchestrator checks deadlines on day 20 and day 50."""
    w = World(db, settings)
    w.organizations()
    for name, days in VEIN_TO_VEIN.items():
        w.infuse(name, CENTRE_A if name.startswith("a") else CENTRE_B, days)
    w.complete("a3", "follow-up", day(40))
    w.enrol("a4", CENTRE_A)
    w.enrol("a5", CENTRE_A)
    revoked = w.call("GET", f"CarePlan/{w.ids['a5']}")
    revoked |= {"status": "revoked", "period": {**revoked["period"], "end": instant(day(5))}}
    w.call("PUT", f"CarePlan/{revoked['id']}", revoked)
    w.enrol("b2", CENTRE_B)
    w.complete("b2", "intake", day(1))
    w.complete("b2", "apheresis", day(2))
    w.enrol("c1", CENTRE_B, at=day(45), plan=OTHER)
    w.check_deadlines(day(20))
    w.check_deadlines(day(50))
    return w


@pytest.fixture
def board(world: World) -> Board:
    built = Board(world.db)
    assert built.refresh() and built.version == 1
    return built


def careplans(programme: Programme) -> set[str]:
    return {row.careplan_id for row in programme.journeys.items}


# -- the figures ---------------------------------------------------------------------------
def test_counts_journeys_by_status_and_running_ones_by_stage(world: World,
                                                             board: Board) -> None:
    page = board.programme(ADMIN, now=NOW)
    assert page.counts == Counts(total=8, active=6, on_hold=0, completed=1, stopped=1)
    assert [(s.stage, s.title, s.active, s.overdue) for s in page.by_stage] == [
        ("intake", "Intake", 2, 1),  # a4 and c1 (a5's open intake is revoked)
        ("apheresis", "Apheresis", 0, 0),
        ("manufacturing", "Manufacturing", 1, 1),  # b2
        ("infusion", "Infusion", 0, 0),
        ("follow-up", "Follow-Up", 3, 0)]  # a1, a2, b1
    assert page.journeys.total == 8 and careplans(page) == set(world.ids.values())


def test_vein_to_vein_median_p90_and_histogram_are_the_hand_computed_ones(
        world: World, board: Board) -> None:
    page = board.programme(ADMIN, now=NOW)
    # 10, 20, 30, 40: the median is the mean of the middle two; p90 sits at rank
    # 3 * 0.9 = 2.7, seven tenths of the way from 30 to 40.
    assert page.vein_to_vein == Distribution(
        count=4, median=25.0, p90=37.0, min=10.0, max=40.0,
        bins=(Bin(7, 14, 1), Bin(14, 21, 1), Bin(21, 28, 0), Bin(28, 35, 1), Bin(35, 42, 1)))
    [(a, site_a), (b, site_b)] = [(g.value, g.distribution) for g in page.by_site]
    assert (a, b) == (CENTRE_A, CENTRE_B)
    assert (site_a.count, site_a.median, site_a.p90) == (3, 20.0, 28.0)  # rank 1.8
    assert (site_b.count, site_b.median, site_b.p90) == (1, 40.0, 40.0)
    assert [(g.label, g.distribution.count) for g in page.by_therapy] == [("Test therapy", 4)]
    a1 = board.journey(ADMIN, world.ids["a1"])
    assert a1 is not None
    assert (a1.collected_at, a1.infused_at, a1.vein_to_vein_days) == (day(2), day(12), 10.0)


def test_overdue_tasks_come_most_late_first_and_escalations_newest_first(
        world: World, board: Board) -> None:
    page = board.programme(ADMIN, now=NOW)
    assert page.overdue.total == 2
    assert [(r.careplan_id, r.stage_title, r.owner_label, r.due, r.days_late)
            for r in page.overdue.items] == [
        (world.ids["a4"], "Intake", "Centre A", day(2), 54.0),
        (world.ids["b2"], "Manufacturing", "Cell Factory", day(32), 24.0)]
    assert [(e.careplan_id, e.text, e.since) for e in page.escalations.items] == [
        (world.ids["b2"], "Overdue: Manufacturing", day(50)),
        (world.ids["a4"], "Overdue: Intake", day(20))]
    assert page.escalations.total == 2
    rows = page.journeys.items
    assert {rows[0].careplan_id, rows[1].careplan_id} == {world.ids["a4"], world.ids["b2"]}
    assert rows[0].overdue == 1 and rows[-1].careplan_id == world.ids["c1"]  # the newest
    a4 = next(r for r in rows if r.careplan_id == world.ids["a4"])
    assert (a4.patient_label, a4.site_label, a4.current, a4.started, a4.days_in_journey) == (
        "A4 Doe", "Centre A", ("Intake",), T0.date(), 56)


def test_trend_counts_starts_infusions_and_running_journeys_each_week(
        world: World, board: Board) -> None:
    trend = board.programme(ADMIN, now=NOW).trend
    assert len(trend) == 12
    assert trend[0] == WeekPoint(date(2026, 2, 3), date(2026, 2, 9), 0, 0, 0)
    assert trend[-1].end == NOW.date()
    assert [w.started for w in trend] == [0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 1, 0]
    assert [w.infused for w in trend] == [0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0]
    # a5 stopped on day 5, a3 ended on day 40, c1 started on day 45.
    assert [w.active for w in trend] == [0, 0, 0, 7, 6, 6, 6, 6, 6, 5, 6, 6]


# -- who sees what ------------------------------------------------------------------------
def test_a_treatment_centre_sees_only_its_own_patients_journeys(world: World,
                                                                board: Board) -> None:
    a_ids = {world.ids[n] for n in ("a1", "a2", "a3", "a4", "a5")}
    centre_a = Viewer("treatment-centre", CENTRE_A)
    page = board.programme(centre_a, now=NOW)
    assert page.counts.total == 5 and careplans(page) == a_ids
    assert {r.careplan_id for r in page.overdue.items} == {world.ids["a4"]}
    assert {e.careplan_id for e in page.escalations.items} == {world.ids["a4"]}
    assert page.vein_to_vein.count == 3
    assert [o.value for o in board.options(centre_a).sites] == [CENTRE_A]
    centre_b = board.programme(Viewer("treatment-centre", CENTRE_B), now=NOW)
    assert careplans(centre_b) == {world.ids[n] for n in ("b1", "b2", "c1")}
    assert not board.visible(centre_a, world.ids["b1"])
    assert board.journey(centre_a, world.ids["b1"]) is None
    assert board.visible(centre_a, world.ids["a1"])
    stranger = board.programme(Viewer("treatment-centre", "Organization/nobody"), now=NOW)
    assert stranger.counts.total == 0 and stranger.journeys.items == ()


def test_a_partner_sees_the_journeys_where_it_owns_a_task_and_no_patient_names(
        world: World, board: Board) -> None:
    maker = Viewer("manufacturer", MAKER)
    page = board.programme(maker, now=NOW)
    assert careplans(page) == {world.ids[n] for n in ("a1", "a2", "a3", "b1", "b2")}
    assert all(r.patient_label == f"Journey {r.careplan_id[:8]}" for r in page.journeys.items)
    assert all("Doe" not in r.patient_label for r in page.overdue.items)
    journey = board.journey(maker, world.ids["b2"])
    assert journey is not None and "Doe" not in journey.patient_label
    assert not board.visible(maker, world.ids["a4"])  # never reached manufacturing
    apheresis = board.programme(Viewer("apheresis-centre", APHERESIS), now=NOW)
    assert apheresis.journeys.items[0].patient_label.endswith("Doe")  # may know the patient


# -- filters ------------------------------------------------------------------------------
def test_filters_narrow_by_therapy_site_and_start_day(world: World, board: Board) -> None:
    def total(**given: Any) -> int:
        return board.programme(ADMIN, Filters(**given), now=NOW).counts.total

    assert total(therapy=OTHER["url"]) == 1
    assert total(therapy=THERAPY["url"]) == 7
    assert total(site=CENTRE_B) == 3
    assert total(site=CENTRE_B, therapy=THERAPY["url"]) == 2
    assert total(since=day(30).date()) == 1
    assert total(until=T0.date()) == 7
    assert total(since=T0.date(), until=T0.date()) == 7
    assert total(since=day(1).date(), until=day(44).date()) == 0
    options = board.options(ADMIN)
    assert [(o.value, o.label) for o in options.therapies] == [
        (OTHER["url"], "Other therapy"), (THERAPY["url"], "Test therapy")]
    assert [o.label for o in options.sites] == ["Centre A", "Centre B"]
    bounded = board.programme(ADMIN, Filters(since=day(-6).date(), until=day(7).date()),
                              now=NOW)
    assert [(w.start, w.started) for w in bounded.trend] == [
        (date(2026, 2, 24), 7), (date(2026, 3, 3), 0)]


def test_filters_read_from_a_query_string_and_bad_dates_are_refused() -> None:
    assert Filters.from_query({"therapy": THERAPY["url"] + "|1", "site": " ", "since":
                               "2026-03-01", "until": ""}) == Filters(
        therapy=THERAPY["url"], since=date(2026, 3, 1))
    with pytest.raises(ValueError, match="'since' must be a date written as YYYY-MM-DD"):
        Filters.from_query({"since": "2026-02-30"})
    with pytest.raises(ValueError, match=r"'since' \(2026-03-02\) is after 'until'"):
        Filters.from_query({"since": "2026-03-02", "until": "2026-03-01"})


# -- keeping current ------------------------------------------------------------------------
def test_refresh_picks_up_a_task_completion_and_changes_nothing_when_nothing_changed(
        world: World, board: Board) -> None:
    assert board.refresh() is False and board.version == 1  # rows re-read: no difference
    assert board.refresh() is False and board.version == 1
    world.complete("b2", "manufacturing", day(51), advance=False)
    assert board.refresh() is True and board.version == 2
    page = board.programme(ADMIN, now=NOW)
    assert page.overdue.total == 1
    assert {s.stage: s.active for s in page.by_stage}["manufacturing"] == 0
    world.orchestrator.run_once()  # writes b2's infusion Task
    assert board.refresh() is True and board.version == 3
    b2 = board.journey(ADMIN, world.ids["b2"])
    assert b2 is not None and b2.current == ("infusion",)
    assert board.refresh() is False and board.version == 3


def test_refresh_follows_flags_organisations_enrolments_and_deleted_tasks(
        world: World, board: Board) -> None:
    [flag] = [e for e in board.programme(ADMIN, now=NOW).escalations.items
              if e.careplan_id == world.ids["a4"]]
    acknowledged = world.call("GET", f"Flag/{flag.flag_id}") | {"status": "inactive"}
    world.call("PUT", f"Flag/{flag.flag_id}", acknowledged)
    assert board.refresh()
    assert [e.careplan_id for e in board.programme(ADMIN, now=NOW).escalations.items] == [
        world.ids["b2"]]
    world.call("PUT", CENTRE_A, {"resourceType": "Organization", "id": "centre-a",
                                 "name": "Centre A, Lyon"})
    assert board.refresh()
    assert board.options(ADMIN).sites[0].label == "Centre A, Lyon"
    assert board.programme(ADMIN, now=NOW).overdue.items[0].owner_label == "Centre A, Lyon"
    new = world.enrol("a6", CENTRE_A, at=day(55))
    assert board.refresh()
    assert board.visible(Viewer("treatment-centre", CENTRE_A), new)
    world.call("DELETE", f"Task/{resource_id('Task', world.ids['c1'], 'intake', 1)}")
    assert board.refresh()
    c1 = board.journey(ADMIN, world.ids["c1"])
    assert c1 is not None and c1.stages == () and c1.current == ()


def test_a_refreshed_board_shows_what_a_fresh_build_shows(world: World, board: Board) -> None:
    world.complete("b2", "manufacturing", day(51))
    world.complete("a1", "follow-up", day(52))
    world.call("PUT", f"PlanDefinition/{OTHER['id']}", OTHER | {"title": "Allogeneic"})
    world.enrol("b3", CENTRE_B, at=day(53), plan=OTHER)
    board.refresh()
    fresh = Board(world.db)
    assert _without_version(board.programme(ADMIN, now=NOW)) == _without_version(
        fresh.programme(ADMIN, now=NOW))
    assert board.programme(ADMIN, Filters(therapy=OTHER["url"]), now=NOW).journeys.items[
        0].therapy_title == "Allogeneic"


def _without_version(page: Programme) -> Programme:
    return replace(page, version=0, refreshed_at=T0)


def test_concurrent_refreshes_apply_a_change_once(world: World, board: Board) -> None:
    world.complete("b2", "manufacturing", day(51), advance=False)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(board.refresh()))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [False, False, False, True] and board.version == 2


@pytest.fixture
def postgres_only(database_url: str) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite commits changes in sequence order: no gap to wait at")


@pytest.mark.usefixtures("postgres_only")
def test_refresh_waits_at_a_gap_until_the_earlier_transaction_commits(
        world: World, board: Board) -> None:
    """PostgreSQL draws change-log numbers before commit: a change committed after a
    later one must still be read."""
    def finish(task: dict[str, Any], repo: Repository) -> None:
        repo.update(task | {"status": "completed", "executionPeriod": {
            "end": instant(day(51))}}, task["id"])

    with world.db.write() as first:  # open while a later change commits
        finish(world.task("b2", "manufacturing"), Repository(first))
        with world.db.write() as second:
            finish(world.task("a4", "intake"), Repository(second))
        assert board.refresh()
        assert board.programme(ADMIN, now=NOW).overdue.total == 1  # a4's done, b2's open
    assert board.refresh()
    assert board.programme(ADMIN, now=NOW).overdue.total == 0
