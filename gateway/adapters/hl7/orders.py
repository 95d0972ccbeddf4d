"""Manufacturing orders for the LIMS: a reactor over the change log that, for each active
manufacturing ServiceRequest (stage code `manufacturing` of the protocol stage CodeSystem)
carrying a chain of identity, stores its OML^O21 as a pending outbound message, once per
ServiceRequest, in the transaction that moves its cursor. Sending is sender.py's."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from gateway.adapters.hl7 import messages
from gateway.custody.coi import coi_of
from gateway.settings import Settings
from gateway.store.database import Database, safe_position, start_position
from gateway.store.driver import changes_after
from gateway.store.repository import Repository
from gateway.store.schema import reactor_cursors
from gateway.store.timeparse import now_micros
from mappings import hl7v2
from orchestration.protocol import STAGE_SYSTEM
from orchestration.writes import BOOKED_INPUT

log = logging.getLogger("atm.hl7")
CURSOR = "hl7-orders"
MANUFACTURING = "manufacturing"
OML = "OML^O21"


class OrderBook:
    """Reads the change log after its cursor; writes the orders it finds due."""

    def __init__(self, db: Database, settings: Settings, *, batch: int = 500,
                 gap_grace: timedelta = timedelta(seconds=30),
                 on_order: Callable[[], None] | None = None) -> None:
        self.db, self.settings, self.batch, self.gap_grace = db, settings, batch, gap_grace
        self.on_order = on_order or (lambda: None)
        self._position: int | None = None  # the cursor, as far as this process has read
        self._saved_at = 0.0

    def run_once(self) -> int:
        """React to the changes after the cursor; the number of changes consumed."""
        if self._position is None:
            self._position = self._start()
        cursor = self._position
        with self.db.read() as conn:
            rows = changes_after(conn, cursor, self.batch)
        old_enough = int((datetime.now(UTC) - self.gap_grace).timestamp() * 1_000_000)
        position = safe_position(cursor, rows, old_enough)
        # Created, or changed: an order activated, or given its chain of identity, later.
        requests = list(dict.fromkeys(r.res_id for r in rows if r.seq <= position and
                                      r.res_type == "ServiceRequest"))
        # Most changes order nothing: the cursor is then stored at most once a second (a
        # restart re-reads a second's changes, and orders nothing twice).
        if requests or (position > cursor and time.monotonic() - self._saved_at > 1.0):
            with self.db.write(notify=False) as conn:
                made = sum(self._order(conn, request_id) for request_id in requests)
                _save_cursor(conn, position)
            self._saved_at = time.monotonic()
            if made:
                self.on_order()
        self._position = position
        return sum(1 for r in rows if r.seq <= position)

    def prime(self) -> None:
        """Read (or, the first time, place) the cursor now: what is asked from this moment
        on is ordered, even before the first round."""
        try:
            self._position = self._start()
        except Exception:  # noqa: BLE001 - the first round tries again
            log.exception("the HL7 order cursor could not be read; retrying")

    def _start(self) -> int:
        """The stored cursor; the first time, the end of the change log: orders are made
        for what is asked from then on, not for every manufacturing order in the store's
        past (whose batches are long made)."""
        with self.db.write(notify=False) as conn:
            stored = conn.execute(select(reactor_cursors.c.seq)
                                  .where(reactor_cursors.c.name == CURSOR)).scalar()
            if stored is not None:
                return int(stored)
            # Not past a gap that a transaction still open (a ServiceRequest being
            # written now) may fill: that order is made when it commits.
            end = start_position(conn)
            _save_cursor(conn, end)
            return end

    def serve(self, stop: threading.Event) -> None:
        """React until `stop`: at once after a commit in this process, within the poll
        interval of one made elsewhere."""
        committed = self.db.committed.listen()
        while not stop.is_set():
            committed.clear()  # before reading: a commit after it wakes the wait
            try:
                consumed = self.run_once()
            except Exception:  # noqa: BLE001 - keep reacting; the cursor did not move
                log.exception("making HL7 orders from the change log failed; retrying")
                consumed = 0
                stop.wait(self.settings.hl7_poll_seconds)
            if consumed < self.batch:
                committed.wait(self.settings.hl7_poll_seconds)

    def _order(self, conn: Connection, request_id: str) -> bool:
        """The OML^O21 of a manufacturing ServiceRequest, stored pending (once)."""
        repo = Repository(conn)
        version = repo.read("ServiceRequest", request_id)
        request = version.resource() if version is not None and not version.deleted else {}
        if not is_manufacturing_order(request):
            return False
        source, coi = f"ServiceRequest/{request_id}", coi_of(request)
        if coi is None:  # the manufacturer works by the code alone: wait until it is given
            log.warning("%s carries no chain of identity yet: its OML^O21 waits for it",
                        source)
            return False
        control_id = "ATM" + uuid.uuid4().hex[:17].upper()  # MSH-10: 20 characters at most
        row: dict[str, Any] = {
            "direction": messages.OUT, "control_id": control_id, "coi": coi,
            "application": self.settings.hl7_application, "source": source,
            "facility": self.settings.hl7_facility, "message_type": OML}
        text = hl7v2.oml_o21(_order(repo, request, coi, control_id, self.settings))
        made = messages.insert(conn, **row, raw=text, status=messages.PENDING) is not None
        if made:
            log.info("OML^O21 %s for %s (chain of identity %s) waits to be sent",
                     control_id, source, coi)
        return made


def is_manufacturing_order(request: dict[str, Any]) -> bool:
    """An active ServiceRequest for the `manufacturing` stage of a protocol."""
    return request.get("status") == "active" and any(
        c.get("system") == STAGE_SYSTEM and c.get("code") == MANUFACTURING
        for c in request.get("code", {}).get("coding", []))


def _order(repo: Repository, request: dict[str, Any], coi: str, control_id: str,
           settings: Settings) -> hl7v2.ManufacturingOrder:
    start, end = _requested(repo, request)
    return hl7v2.ManufacturingOrder(
        control_id=control_id, coi=coi, placer_order=request["id"],
        product=_product(repo, request), start=start, end=end,
        priority=request.get("priority", "routine"),
        sender=(settings.hl7_application, settings.hl7_facility),
        receiver=(settings.hl7_lims_application, settings.hl7_lims_facility),
        now=datetime.now(UTC))


def _product(repo: Repository, request: dict[str, Any]) -> tuple[str, str]:
    """The protocol the enrolment follows (its id and title): what is to be made."""
    for reference in request.get("basedOn", []):
        ref = str(reference.get("reference", ""))
        found = repo.read("CarePlan", ref.split("/", 1)[1]) if ref.startswith("CarePlan/") \
            else None
        if found is not None and not found.deleted:
            plan = found.resource()
            canonical = next(iter(plan.get("instantiatesCanonical", [])), "")
            code = canonical.split("|")[0].rstrip("/").rsplit("/", 1)[-1]
            return code or "unknown", str(plan.get("title", code))
    return "unknown", "unknown product"


def _requested(repo: Repository, request: dict[str, Any]) -> tuple[str | None, str | None]:
    """When manufacturing is wanted: the order's own occurrence, else the booked
    manufacturing appointment of the Task about it, else that Task's period."""
    if period := request.get("occurrencePeriod"):
        return period.get("start"), period.get("end")
    if at := request.get("occurrenceDateTime"):
        return at, None
    tasks = [v.resource() for v in repo.read_many([("Task", i) for i, _ in repo.referring(
        "Task", "focus", "ServiceRequest", [request["id"]])]).values()]
    for task in tasks:
        for item in task.get("input", []):
            ref = str(item.get("valueReference", {}).get("reference", ""))
            if item.get("type", {}).get("text") == BOOKED_INPUT and ref.startswith(
                    "Appointment/"):
                booked = repo.read("Appointment", ref.split("/", 1)[1])
                if booked is not None and not booked.deleted:
                    appointment = booked.resource()
                    return appointment.get("start"), appointment.get("end")
        if period := task.get("restriction", {}).get("period"):
            return period.get("start"), period.get("end")
    return None, None


def _save_cursor(conn: Connection, seq: int) -> None:
    """Forward only: two processes making orders never move it back."""
    current = conn.execute(select(reactor_cursors.c.seq)
                           .where(reactor_cursors.c.name == CURSOR)).scalar()
    values = {"seq": seq, "updated_at": now_micros()}
    if current is None:
        conn.execute(reactor_cursors.insert().values(name=CURSOR, **values))
    elif seq > current:
        conn.execute(reactor_cursors.update().where(reactor_cursors.c.name == CURSOR)
                     .values(**values))
