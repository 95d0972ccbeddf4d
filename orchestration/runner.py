"""The orchestrator's imperative shell: reads the change log after its cursor, and for each
enrolment a change touched, decides under a lock on its CarePlan and writes the Tasks,
CarePlan changes and Provenances in that one transaction.

Exactly once, without a coordinator: decisions are made from what is stored (not from the
event), under the CarePlan's row lock, and what a step writes has an id derived from
(CarePlan, stage, run). A step replayed after a crash, or raced by a second orchestrator,
finds its work already there and decides nothing new.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from gateway.background import in_thread
from gateway.custody import coi
from gateway.errors import FhirError
from gateway.scheduling.operations import booked_chain
from gateway.services.context import Context
from gateway.services.protocols import plan_definition_id, protocol_from_store
from gateway.services.search import match_ids
from gateway.settings import Settings
from gateway.store.database import BUSY_ROUND_CHANGES, Database, safe_position
from gateway.store.driver import changes_after
from gateway.store.repository import Actor, Repository
from gateway.store.schema import reactor_cursors
from orchestration import writes
from orchestration.applier import Writer, versioned, write
from orchestration.effects import Effect
from orchestration.engine import decide
from orchestration.protocol import Protocol, ProtocolFormError
from orchestration.state import PlanState, plan_state, resource_id

log = logging.getLogger("atm.orchestrator")

ACTOR = Actor(name="orchestrator")
CURSOR = "orchestrator"
ASSIGNS_COI = "chain-of-identity"  # a stage whose completion assigns the enrolment's code
CURSOR_SAVE_SECONDS = 1.0
ROUND_GAP_SECONDS = 0.01
"""After a busy round (BUSY_ROUND_CHANGES), the next changes gather this long: short,
since every partner waiting for its next Task waits for the next round too."""
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Advance:
    """What one call to `advance` did to one enrolment."""

    careplan_id: str
    effects: list[Effect]


class Orchestrator:
    def __init__(self, db: Database, settings: Settings, *, clock: Clock = utc_now,
                 batch: int = 500, gap_grace: timedelta = timedelta(seconds=30),
                 workers: int = 4) -> None:
        self.db, self.settings, self.clock = db, settings, clock
        self.batch, self.gap_grace = batch, gap_grace
        self._position: int | None = None  # the cursor, as far as this process has read
        self._saved_at = 0.0
        self._others_last_round = 0  # changes not the orchestrator's own in the last round
        self._protocols: dict[tuple[str, str], Protocol] = {}
        self._plan_ids: dict[str, str] = {}  # canonical -> PlanDefinition id
        # Enrolments advance side by side, each in its own transaction under its own
        # CarePlan's lock: SQLite commits them in groups, PostgreSQL in parallel.
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="atm-orchestrator")

    def _context(self, conn: Connection) -> Context:
        return Context(db=self.db, settings=self.settings,
                       base_url=self.settings.base_url or "", actor=ACTOR).within(conn)

    # -- the change log ------------------------------------------------------------------
    def run_once(self) -> int:
        """React to the changes after the cursor; the number of changes consumed."""
        if self._position is None:
            self._position = self._cursor()
        cursor = self._position
        with self.db.read() as conn:
            rows = changes_after(conn, cursor, self.batch)
        self._others_last_round = sum(1 for r in rows if r.actor != ACTOR.name)
        if not rows:
            return 0
        touched = self._enrolments_touched([r for r in rows if _may_move_a_plan(r)])
        for _ in self._pool.map(self.advance, touched):
            pass
        self._position = self._safe_position(cursor, rows)
        # A cursor left behind only costs re-reading changes that moved nothing, so it is
        # stored when enrolments moved, and otherwise at most once a second.
        if touched or time.monotonic() - self._saved_at > CURSOR_SAVE_SECONDS:
            self._save_cursor(self._position)
            self._saved_at = time.monotonic()
        return len(rows)

    def _safe_position(self, cursor: int, rows: list[Any]) -> int:
        old_enough = int((self.clock() - self.gap_grace).timestamp() * 1_000_000)
        return safe_position(cursor, rows, old_enough)

    def _enrolments_touched(self, changes: list[Any]) -> list[str]:
        """CarePlans to re-evaluate: changed ones, those of changed Tasks (found through
        the based-on index, without reading the Tasks), and new ones made from referral
        ServiceRequests."""
        if not changes:
            return []
        touched = dict.fromkeys(c.res_id for c in changes if c.res_type == "CarePlan")
        task_ids = sorted({c.res_id for c in changes if c.res_type == "Task"})
        requests = sorted({("ServiceRequest", c.res_id) for c in changes
                           if c.res_type == "ServiceRequest"})
        with self.db.read() as conn:
            repo = Repository(conn)
            touched.update(dict.fromkeys(sorted(repo.referred(
                "Task", "based-on", "CarePlan", task_ids))))
            referrals = repo.read_many(requests) if requests else {}
        for version in referrals.values():
            if not version.deleted and (enrolled := self._enrol_referral(version.resource())):
                touched[enrolled] = None
        return [careplan_id for careplan_id in touched if careplan_id]

    def _cursor(self) -> int:
        with self.db.read() as conn:
            seq = conn.execute(select(reactor_cursors.c.seq)
                               .where(reactor_cursors.c.name == CURSOR)).scalar()
        return int(seq or 0)

    def _save_cursor(self, seq: int) -> None:
        now = int(self.clock().timestamp() * 1_000_000)
        with self.db.write() as conn:
            current = conn.execute(select(reactor_cursors.c.seq)
                                   .where(reactor_cursors.c.name == CURSOR)).scalar()
            if current is None:
                conn.execute(reactor_cursors.insert().values(name=CURSOR, seq=seq,
                                                             updated_at=now))
            elif seq > current:  # two orchestrators: the cursor never moves back
                conn.execute(reactor_cursors.update().where(reactor_cursors.c.name == CURSOR)
                             .values(seq=seq, updated_at=now))

    # -- deadlines -----------------------------------------------------------------------
    def check_deadlines(self) -> int:
        """Re-evaluate every active enrolment (a deadline passes without any write);
        the number of enrolments that had something due."""
        with self.db.read() as conn:
            ctx = self._context(conn)
            ids = match_ids(ctx, Repository(conn), "CarePlan", [("status", "active")],
                            limit=100_000)
        return sum(1 for done in self._pool.map(self._advance_if_due, ids) if done.effects)

    def _advance_if_due(self, careplan_id: str) -> Advance:
        """Look first in a read transaction: most enrolments have nothing due, and need
        no lock or write transaction to find that out."""
        with self.db.read() as conn:
            loaded = self._load(self._context(conn), Repository(conn), careplan_id)
        if loaded is None or not decide(loaded[1], loaded[0], self.clock()):
            return Advance(careplan_id, [])
        return self.advance(careplan_id)

    # -- one enrolment -------------------------------------------------------------------
    def advance(self, careplan_id: str) -> Advance:
        """Decide and write what is due for one enrolment, in one transaction."""
        try:
            with self.db.write() as conn:
                ctx, repo = self._context(conn), Repository(conn, ACTOR)
                repo.lock_rows({("CarePlan", careplan_id)})
                state_and_protocol = self._load(ctx, repo, careplan_id)
                if state_and_protocol is None:
                    return Advance(careplan_id, [])
                state, protocol = state_and_protocol
                now = self.clock()
                effects = decide(protocol, state, now)
                if effects:
                    Writer(ctx, protocol, state, now).apply(effects)
                _assign_coi_when_due(ctx, repo, protocol, state)
                return Advance(careplan_id, effects)
        except FhirError as exc:  # e.g. a Task a partner changed while we decided
            log.warning("advancing CarePlan/%s was refused (%s); it is retried on the "
                        "next change", careplan_id, exc)
            return Advance(careplan_id, [])

    def _load(self, ctx: Context, repo: Repository,
              careplan_id: str) -> tuple[PlanState, Protocol] | None:
        version = repo.read("CarePlan", careplan_id)
        if version is None or version.deleted:
            return None
        careplan = version.resource()
        protocol = self._protocol_of(ctx, repo, careplan)
        if protocol is None:
            return None
        task_ids = [i for i, _ in repo.referring("Task", "based-on", "CarePlan", [careplan_id])]
        tasks = [v.resource() for v in repo.read_many([("Task", i) for i in task_ids]).values()]
        subject = careplan.get("subject", {}).get("reference", "")
        patient = None
        if subject.startswith("Patient/"):
            found = repo.read("Patient", subject.split("/", 1)[1])
            patient = found.resource() if found and not found.deleted else None
        booked = ({stage: v.resource() for stage, v in
                   booked_chain(ctx, repo, careplan_id).items()}
                  if protocol.booking_stage() is not None else {})
        return plan_state(careplan, tasks, patient, booked), protocol

    def _protocol_of(self, ctx: Context, repo: Repository,
                     resource: dict[str, Any]) -> Protocol | None:
        """The protocol a CarePlan or ServiceRequest instantiates, if it is one we hold
        (which PlanDefinition a canonical names is remembered; each version is compiled
        once)."""
        version = None
        for canonical in resource.get("instantiatesCanonical", []):
            plan_id = self._plan_ids.get(canonical)
            version = repo.read("PlanDefinition", plan_id) if plan_id else None
            if version is None or version.deleted:
                plan_id = plan_definition_id(ctx, repo, {"instantiatesCanonical": [canonical]})
                version = repo.read("PlanDefinition", plan_id) if plan_id else None
            if version is not None and not version.deleted:
                self._plan_ids[canonical] = version.id
                break
        if version is None or version.deleted:
            return None
        key = (version.id, str(version.version))
        if key not in self._protocols:
            try:
                self._protocols[key] = protocol_from_store(ctx, repo, version.resource())
            except ProtocolFormError as exc:
                log.error("PlanDefinition/%s cannot be run: %s", version.id, exc)
                return None
        return self._protocols[key]

    def _enrol_referral(self, request: dict[str, Any]) -> str | None:
        """A referral ServiceRequest for a protocol we hold gets its CarePlan (once)."""
        if request.get("status") != "active" or not request.get("instantiatesCanonical"):
            return None
        if not request.get("subject", {}).get("reference"):
            return None  # named by identifier only: enrolled once EHR intake has imported it
        careplan_id = resource_id("CarePlan", request["id"], "enrolment", 1)
        with self.db.write() as conn:
            ctx, repo = self._context(conn), Repository(conn, ACTOR)
            protocol = self._protocol_of(ctx, repo, request)
            if protocol is None:
                return None
            if repo.read("CarePlan", careplan_id) is not None:
                return careplan_id
            careplan = {
                "resourceType": "CarePlan", "status": "active", "intent": "plan",
                "instantiatesCanonical": [protocol.canonical], "title": protocol.title,
                "subject": request.get("subject"),
                "basedOn": [{"reference": f"ServiceRequest/{request['id']}"}],
                "created": writes.instant(self.clock())}
            if request.get("requester"):
                careplan["author"] = request["requester"]
            written = write(ctx, "POST", "CarePlan", careplan, assigned_id=careplan_id)
            write(ctx, "POST", "Provenance", writes.provenance(
                [versioned(written)], versioned(request), "referral for "
                f"{protocol.title}: enrolled", "CREATE", self.clock()))
        return careplan_id

    # -- running beside the server -------------------------------------------------------
    def serve(self, stop: threading.Event, poll: float = 0.2,
              deadlines_every: float = 60.0) -> None:
        """React until `stop` is set: at once after a commit in this process, within
        `poll` seconds of one made elsewhere; check deadlines every `deadlines_every`."""
        try:
            self._react(stop, poll, deadlines_every)
        finally:
            self.close()

    def close(self) -> None:
        """Let the advancing threads finish and end."""
        self._pool.shutdown(wait=True)

    def _react(self, stop: threading.Event, poll: float, deadlines_every: float) -> None:
        next_deadlines, device = 0.0, False
        committed = self.db.committed.listen()
        while not stop.is_set():
            committed.clear()  # before reading: a commit after it wakes the wait
            try:
                if not device:
                    self.ensure_device()
                    device = True
                consumed = self.run_once()
                if self.clock().timestamp() >= next_deadlines:
                    self.check_deadlines()
                    next_deadlines = self.clock().timestamp() + deadlines_every
            except Exception:  # noqa: BLE001 - keep reacting; the cursor did not move
                log.exception("orchestrator round failed; retrying")
                consumed = 0
                stop.wait(poll)
            if consumed < self.batch:
                if self._others_last_round >= BUSY_ROUND_CHANGES:
                    stop.wait(ROUND_GAP_SECONDS)  # busy: let the next changes gather
                committed.wait(poll)  # the next commit starts a round at once

    def ensure_device(self) -> None:
        """The Device every orchestrator Provenance names as its agent (written once,
        with its own Provenance like every other write of the orchestrator)."""
        with self.db.write() as conn:
            ctx = self._context(conn)
            if Repository(conn).read("Device", "atm-orchestrator") is None:
                device = write(ctx, "PUT", "Device/atm-orchestrator",
                               writes.orchestrator_device())
                write(ctx, "POST", "Provenance", writes.provenance(
                    [versioned(device)], None, "the orchestrator registered itself",
                    "CREATE", self.clock()))


@contextmanager
def running_beside(db: Database, settings: Settings) -> Iterator[Orchestrator | None]:
    """The orchestrator in a thread beside the API while the block runs (if enabled)."""
    if not settings.orchestrator:
        yield None
        return
    orchestrator = Orchestrator(db, settings, workers=settings.orchestrator_workers)
    with in_thread(lambda stop: orchestrator.serve(stop, settings.orchestrator_poll_seconds,
                                                   settings.deadline_check_seconds),
                   "atm-orchestrator"):
        yield orchestrator


def _assign_coi_when_due(ctx: Context, repo: Repository, protocol: Protocol,
                         state: PlanState) -> None:
    """Once the protocol's assignment step is done, the enrolment gets its chain of
    identity (after the step's other writes, so that the Tasks just made carry it too)."""
    if coi.coi_of(state.careplan) is not None:
        return
    if any(stage.assigns == ASSIGNS_COI and (run := state.runs.get(stage.id)) is not None
           and run.outcome == "done" for stage in protocol.stages.values()):
        coi.assign(ctx, repo, state.careplan_id)


def _may_move_a_plan(change: Any) -> bool:
    """Changes that can move an enrolment: to CarePlans, referral ServiceRequests, and
    Tasks other than new ones (a plan's Tasks are written by the orchestrator; a Task
    someone else creates is not one of its stages)."""
    if change.actor == ACTOR.name:
        return False  # each advance goes as far as it can in one pass
    if change.res_type == "Task":
        return bool(change.interaction != "create")
    return change.res_type in ("CarePlan", "ServiceRequest")
