"""The programme view's read model: one frozen summary per journey (CarePlan), built once
from the store and kept current from its change log. The page's figures are computed from
those summaries by gateway/dashboard/programme.py.

Why a read model: with 5,000 running journeys (~75,000 Tasks) the page must answer in
well under 500 ms, so it may not re-read the Tasks' JSON per request. The board reads
everything once, in bulk, then re-summarises only the journeys each change touches,
following the change log as the orchestrator does (orchestration/runner.py).
"""

from __future__ import annotations

import gc
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection

from gateway.dashboard.journeys import (
    Catalogue,
    Filters,
    JourneySummary,
    Viewer,
    catalogue_of,
    flag_about,
    reference,
    summarise,
)
from gateway.dashboard.programme import Options, Programme, options_of, programme_of
from gateway.store.database import Database, safe_position, settled_position
from gateway.store.driver import Driver, changes_after
from gateway.store.repository import Repository

__all__ = ["Board", "Filters", "Options", "Programme", "Viewer"]
"""What the pages import from here; the figures' own types are in programme.py."""

Clock = Callable[[], datetime]
CHUNK = 500  # ids per IN (...) list
NOT_JOURNEYS = frozenset({"draft", "entered-in-error"})
"""CarePlan statuses left off the board: not (or never) a patient's journey."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


@dataclass(frozen=True)
class _State:
    """What the board knows, replaced whole by each refresh that changes something:
    readers take one reference and never see half a refresh."""

    journeys: Mapping[str, JourneySummary]
    catalogue: Catalogue
    flags: Mapping[str, dict[str, Any]]  # open Flags the gateway raised, by id
    position: int  # the change log is read up to here
    version: int
    refreshed_at: datetime


class Board:
    """Every journey's summary, for the programme page; one per process, shared by its
    threads. The first `refresh()` (or read) builds it (seconds at 5,000 journeys: do it
    at start-up); later ones catch up with the change log, and cost one indexed query
    when nothing changed, so a page may call it before every read:

        board = Board(db)
        board.refresh()
        page = board.programme(Viewer("treatment-centre", "Organization/x"),
                               Filters.from_query(query))
    """

    def __init__(self, db: Database, *, clock: Clock = utc_now,
                 gap_grace: timedelta = timedelta(seconds=30), batch: int = 5000) -> None:
        self.db, self.clock, self.gap_grace, self.batch = db, clock, gap_grace, batch
        self._lock = threading.Lock()
        self._state: _State | None = None

    @property
    def version(self) -> int:
        """Increases whenever a refresh changed what the board shows (0 before the first)."""
        return self._state.version if self._state else 0

    @property
    def refreshed_at(self) -> datetime | None:
        """When the board last looked at the store."""
        return self._state.refreshed_at if self._state else None

    # -- reading ---------------------------------------------------------------------
    def programme(self, viewer: Viewer, filters: Filters | None = None,
                  now: datetime | None = None) -> Programme:
        state = self._current()
        # Its temporaries (sort keys and rows for thousands of journeys and Flags) die
        # young; a collection in between promotes them to the oldest generation, and every
        # hundred or so pages that sets off a full one, which walks the board (~300 ms).
        with _collector_paused():
            return programme_of(state.journeys.values(), state.catalogue, viewer,
                                filters or Filters(), now or self.clock(),
                                version=state.version, refreshed_at=state.refreshed_at)

    def options(self, viewer: Viewer) -> Options:
        """The therapies and sites this viewer may filter by."""
        return options_of(self._current().journeys.values(), viewer)

    def visible(self, viewer: Viewer, careplan_id: str) -> bool:
        found = self._current().journeys.get(careplan_id)
        return found is not None and viewer.sees(found)

    def journey(self, viewer: Viewer, careplan_id: str) -> JourneySummary | None:
        """One journey as this viewer may see it; None when unknown or not theirs."""
        found = self._current().journeys.get(careplan_id)
        if found is None or not viewer.sees(found):
            return None
        return replace(found, patient_label=viewer.patient_label(found))

    def _current(self) -> _State:
        state = self._state
        if state is None:
            self.refresh()
            state = self._state
        assert state is not None
        return state

    # -- keeping current -------------------------------------------------------------
    def refresh(self) -> bool:
        """Catch up with the store; True when what the board shows has changed."""
        with self._lock:
            now = self.clock()
            state = self._state
            if state is None:
                self._state = self._build(now)
                return True
            with self.db.read() as conn:
                changes = self._changes_after(conn, state.position)
            self._state = (self._apply(state, changes, now) if changes
                           else replace(state, refreshed_at=now))
            return self._state.version != state.version

    def _old_enough(self, now: datetime) -> int:
        return micros(now - self.gap_grace)

    def _build(self, now: datetime) -> _State:
        with self.db.read() as conn, _collector_paused():
            # The position first: whatever commits after it is read again on refresh.
            # Past the grace window's gaps (see _apply), the resources read next hold it.
            old_enough = self._old_enough(now)
            settled = settled_position(conn, old_enough)
            position = safe_position(settled, self._changes_after(conn, settled), old_enough)
            reader = _Reader(conn)
            catalogue = catalogue_of(reader.all("PlanDefinition").values(),
                                     _names(reader.all("Organization")))
            flags = _open_flags(reader.all("Flag"))
            journeys = _summaries(reader, None, catalogue, flags)
        # One full collection now, while the build is being waited for anyway: the
        # collector then counts the board as long-lived, and takes no pause of that size
        # (~300 ms at 5,000 journeys) in the middle of one of the next pages.
        gc.collect()
        return _State(journeys, catalogue, flags, position, 1, now)

    def _changes_after(self, conn: Connection, position: int) -> list[Any]:
        """Every change-log row after `position`, in seq order."""
        rows: list[Any] = []
        while True:
            after = rows[-1].seq if rows else position
            batch = changes_after(conn, after, self.batch)
            rows += batch
            if len(batch) < self.batch:
                return rows

    def _apply(self, state: _State, changes: list[Any], now: datetime) -> _State:
        """Re-summarise the journeys these changes touch. The position moves past them
        by the orchestrator's gap rule: PostgreSQL commits sequence numbers out of
        order, so rows after a recent gap are read again next time (re-summarising a
        journey that did not change changes nothing)."""
        changed = _by_type(changes)
        with self.db.read() as conn:
            reader = _Reader(conn)
            catalogue = _updated_catalogue(reader, state.catalogue, changed)
            flags = _updated_flags(reader, state.flags, changed.get("Flag", set()))
            touched = _touched(reader, state, changes, changed, flags, catalogue)
            fresh = _summaries(reader, touched, catalogue, flags)
        journeys = {k: v for k, v in state.journeys.items() if k not in touched}
        journeys.update(fresh)
        moved = (catalogue != state.catalogue
                 or any(state.journeys.get(i) != journeys.get(i) for i in touched))
        position = safe_position(state.position, changes, self._old_enough(now))
        return _State(journeys, catalogue, flags, position,
                      state.version + (1 if moved else 0), now)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while tens of thousands of objects are
    alive at once: each collection it would start walks all of them, which made parsing
    61k Tasks 3-5x slower (35 µs a Task instead of 7). They hold no cycles; reference
    counting frees them as usual. (Process-wide: another thread pausing it at the same
    time may resume it early, which only costs a collection.)"""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


# -- what a change touches ---------------------------------------------------------------
def _by_type(changes: list[Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for change in changes:
        found[change.res_type].add(change.res_id)
    return found


def _touched(reader: _Reader, state: _State, changes: list[Any], changed: dict[str, set[str]],
             flags: Mapping[str, dict[str, Any]], catalogue: Catalogue) -> set[str]:
    """The journeys to re-summarise: changed CarePlans; those of changed Tasks (through
    the based-on index, or a deleted Task's last version); of Flags opened or closed
    (through the Task they are about, else their patient); of changed Patients; and
    those naming a changed Organization or PlanDefinition."""
    touched = set(changed.get("CarePlan", ()))
    tasks = sorted(changed.get("Task", ()))
    touched |= reader.careplans_of_tasks(tasks)
    touched |= reader.careplans_of_deleted_tasks(
        [c for c in changes if c.res_type == "Task" and c.interaction == "delete"])
    about, patients = set(), {f"Patient/{i}" for i in changed.get("Patient", ())}
    for flag_id in changed.get("Flag", ()):
        for flag in (state.flags.get(flag_id), flags.get(flag_id)):
            target = flag_about(flag) if flag else None
            if target and target.startswith("Task/"):
                about.add(target.removeprefix("Task/"))
            elif flag and (subject := reference(flag.get("subject"))):
                patients.add(subject)
    touched |= reader.careplans_of_tasks(sorted(about))
    renamed = {f"Organization/{i}" for i in changed.get("Organization", ())}
    before, after = state.catalogue.therapies, catalogue.therapies
    therapies = {t.url for key in before.keys() | after.keys()
                 if before.get(key) != after.get(key)
                 for t in (before.get(key), after.get(key)) if t is not None}
    touched |= {j.careplan_id for j in state.journeys.values()
                if j.patient in patients or j.therapy in therapies
                or (renamed and renamed & j.organizations)}
    return touched


def _updated_catalogue(reader: _Reader, catalogue: Catalogue,
                       changed: dict[str, set[str]]) -> Catalogue:
    """Protocols are few: any PlanDefinition change re-reads them all. A changed
    Organization has its name read again."""
    if not changed.get("PlanDefinition") and not changed.get("Organization"):
        return catalogue
    names = dict(catalogue.names)
    for org_id in changed.get("Organization", ()):
        names.pop(f"Organization/{org_id}", None)
    names.update(_names(reader.some("Organization", sorted(changed.get("Organization", ())))))
    if changed.get("PlanDefinition"):
        return catalogue_of(reader.all("PlanDefinition").values(), names)
    return replace(catalogue, names=names)


def _updated_flags(reader: _Reader, flags: Mapping[str, dict[str, Any]],
                   changed: set[str]) -> Mapping[str, dict[str, Any]]:
    if not changed:
        return flags
    kept = {k: v for k, v in flags.items() if k not in changed}
    kept.update(_open_flags(reader.some("Flag", sorted(changed))))
    return kept


# -- reading the store in bulk -----------------------------------------------------------
_CURRENT = "SELECT res_id, content FROM resources WHERE res_type = {m} AND deleted = {m}"
_TASKS_OF = ("SELECT s.target_id, r.content FROM sp_reference s JOIN resources r "
             "ON r.res_type = s.res_type AND r.res_id = s.res_id "
             "WHERE s.res_type = 'Task' AND s.param = 'based-on' AND s.target_type = 'CarePlan'"
             " AND r.deleted = {m}")


class _Reader:
    """Current resources as raw JSON parsed with orjson, a few queries per type, on the
    driver's cursor: the board reads tens of thousands at once, where per-resource reads,
    SQLAlchemy's result rows or model validation would cost seconds (PERFORMANCE.md)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._driver = Driver(conn)
        self._mark = self._driver.sql.mark

    def all(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return self._rows(_CURRENT, (resource_type, False))

    def some(self, resource_type: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted(set(ids))):
            found.update(self._rows(_CURRENT + self._in("res_id", chunk),
                                    (resource_type, False, *chunk)))
        return found

    def tasks_of(self, careplan_ids: list[str] | None) -> dict[str, list[dict[str, Any]]]:
        """Tasks by the CarePlan they are based on (all CarePlans' when None), through
        the based-on index."""
        queries = ([(_TASKS_OF, [False])] if careplan_ids is None else
                   [(_TASKS_OF + self._in("s.target_id", c), [False, *c])
                    for c in _chunks(careplan_ids)])
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for sql, params in queries:
            for careplan_id, content in self._execute(sql, params):
                grouped[careplan_id].append(orjson.loads(content))
        return grouped

    def careplans_of_tasks(self, task_ids: list[str]) -> set[str]:
        return Repository(self.conn).referred("Task", "based-on", "CarePlan", task_ids)

    def careplans_of_deleted_tasks(self, deletions: list[Any]) -> set[str]:
        """A deleted Task has left the index: its last version says which plan it was in."""
        repo, found = Repository(self.conn), set()
        for change in deletions:
            last = repo.vread("Task", change.res_id, change.version - 1)
            if last is not None and not last.deleted:
                found |= {r.removeprefix("CarePlan/") for b in last.resource().get("basedOn", [])
                          if (r := reference(b)) and r.startswith("CarePlan/")}
        return found

    def _in(self, column: str, ids: list[str]) -> str:
        return f" AND {column} IN ({', '.join([self._mark] * len(ids))})"

    def _execute(self, sql: str, params: Iterable[Any]) -> Any:
        return self._driver.execute(sql.format(m=self._mark), list(params)).fetchall()

    def _rows(self, sql: str, params: Iterable[Any]) -> dict[str, dict[str, Any]]:
        return {res_id: orjson.loads(content) for res_id, content in self._execute(sql, params)}


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for first in range(0, len(ids), CHUNK):
        yield ids[first:first + CHUNK]


def _names(organizations: Mapping[str, dict[str, Any]]) -> dict[str, str]:
    return {f"Organization/{i}": str(o["name"]) for i, o in organizations.items()
            if o.get("name")}


def _open_flags(flags: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Flags the gateway raised (they say what they are about) that are still open."""
    return {i: f for i, f in flags.items() if f.get("status") == "active" and flag_about(f)}


@dataclass
class _FlagIndex:
    """Open Flags by the Task they are about, and, for those about something else, by
    their subject (a Patient)."""

    by_task: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    by_subject: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, flags: Iterable[dict[str, Any]]) -> _FlagIndex:
        index = cls()
        for flag in flags:
            about = flag_about(flag) or ""
            if about.startswith("Task/"):
                index.by_task[about].append(flag)
            elif subject := reference(flag.get("subject")):
                index.by_subject[subject].append(flag)
        return index

    def about(self, tasks: list[dict[str, Any]], patient: str | None) -> list[dict[str, Any]]:
        found = [f for t in tasks for f in self.by_task.get(f"Task/{t.get('id')}", [])]
        return found + (self.by_subject.get(patient, []) if patient else [])


def _summaries(reader: _Reader, careplan_ids: set[str] | None, catalogue: Catalogue,
               flags: Mapping[str, dict[str, Any]]) -> dict[str, JourneySummary]:
    """Summaries of these CarePlans (every one when None), read in bulk."""
    careplans = (reader.all("CarePlan") if careplan_ids is None
                 else reader.some("CarePlan", careplan_ids))
    careplans = {i: c for i, c in careplans.items()
                 if c.get("instantiatesCanonical") and c.get("status") not in NOT_JOURNEYS}
    tasks = reader.tasks_of(None if careplan_ids is None else sorted(careplans))
    subjects = {i: reference(c.get("subject")) or "" for i, c in careplans.items()}
    patients = reader.some("Patient", [s.removeprefix("Patient/") for s in subjects.values()
                                       if s.startswith("Patient/")])
    index = _FlagIndex.of(flags.values())
    return {i: summarise(careplan, tasks.get(i, []), index.about(tasks.get(i, []), subjects[i]),
                         patients.get(subjects[i].removeprefix("Patient/")), catalogue)
            for i, careplan in careplans.items()}
