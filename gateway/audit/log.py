"""The audit log's storage and its writer thread.

`insert_rows` stores records inside a caller's transaction (a write's own record).
`AuditTrail` takes every other record from the request path (a queue put, no database
work) and stores them in batches from one background thread, chained as they go in; the
same thread chains the writes' own records within CHAIN_EVERY (gateway/audit/chain.py).
If the database refuses, records wait in memory and are retried; past MAX_WAITING,
requests are refused (503) rather than served unrecorded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

from gateway.audit.chain import extend, seal, unchained_exists
from gateway.audit.events import ROW_COLUMNS, Closed, RequestAudit, Row, unversioned
from gateway.errors import FhirError
from gateway.store.database import Database
from gateway.store.driver import Driver
from gateway.store.schema import audit_entities, audit_log

log = logging.getLogger(__name__)

# Seconds between the writer's turns. Each turn is one transaction, and the pages it
# dirties (the table's and five indexes') are written to the WAL and checkpointed once
# per turn, however many records it holds: at 50 ms a read's record cost ~29 µs of the
# writer's CPU, at 250 ms ~19 µs (reads served +6–9%). A record waits no longer than
# the chaining of writes' records (CHAIN_EVERY) already does.
WRITE_EVERY = 0.25
CHAIN_EVERY = 0.25  # seconds between chaining rounds
MAX_WAITING = 100_000  # records held in memory while the database cannot take them
RETRY_SECONDS = 1.0


class AuditUnavailableError(FhirError):
    """The audit trail cannot keep up (the database is refusing writes)."""

    status, code = 503, "transient"


@cache
def _statements(dialect: str) -> tuple[str, str, str]:
    """Insert a row; insert a row and return its seq; index one of its resources."""
    mark = "?" if dialect == "sqlite" else "%s"
    row = (f"INSERT INTO {audit_log.name} ({', '.join(ROW_COLUMNS)}) VALUES "
           f"({', '.join([mark] * len(ROW_COLUMNS))})")
    entity = f"INSERT INTO {audit_entities.name} (reference, seq) VALUES ({mark}, {mark})"
    return row, f"{row} RETURNING seq", entity


def insert_rows(conn: Any, rows: Sequence[Row]) -> None:
    """Store records in the caller's transaction, to be chained by the writer thread (on
    the driver, like the write path). A row naming several resources (a transaction)
    indexes each of them in audit_entities, under the row's seq: only such a row asks
    for it back (RETURNING cost SQLite ~6–15 µs an insert more)."""
    driver = Driver(conn)
    insert_row, insert_row_seq, insert_entity = _statements(conn.dialect.name)
    entities = ROW_COLUMNS.index("entities")
    for row in rows:
        names = (row[entities] or "").split()
        if len(names) <= 1:
            driver.execute(insert_row, row)
            continue
        seq = driver.execute(insert_row_seq, row).fetchone()[0]
        driver.execute_many(insert_entity, sorted({(unversioned(n), seq) for n in names}))


class AuditTrail:
    """The records of requests that did not write: queued here, stored by one thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: queue.SimpleQueue[Closed | threading.Event] = queue.SimpleQueue()
        self._waiting: list[Row] = []  # taken from the queue, not yet stored
        self._stop = threading.Event()
        self._wake = threading.Event()  # set to store at once (a flush, the stop)
        self._thread: threading.Thread | None = None

    # -- the request path ---------------------------------------------------------------
    def begin(self, method: str, path: str, query: str | None, address: str | None,
              request_id: str | None, event_type: str = "rest") -> RequestAudit:
        return RequestAudit(self.put, method, path, query, address, request_id, event_type)

    def put(self, event: Closed) -> None:
        if self._queue.qsize() + len(self._waiting) >= MAX_WAITING:
            raise AuditUnavailableError("The audit trail cannot store records right now, "
                                        "so this request was not served; retry shortly",
                                        headers={"Retry-After": "5"})
        self._queue.put(event)

    # -- the writer thread ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="atm-audit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Store what is queued, chain it, and stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None
        self._catch_up()

    def _catch_up(self) -> None:
        while True:
            self._drain()
            if not self._store_waiting(chain_stored=True) or self._queue.empty():
                break
        try:
            while seal(self.db):
                pass
        except Exception:  # noqa: BLE001 - the next start chains what is left
            log.exception("chaining the audit log failed; it is chained at the next start")

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every record queued before the call is stored and chained."""
        if self._thread is None:
            self._catch_up()
            return
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError("the audit writer did not catch up")

    def _run(self) -> None:
        markers: list[threading.Event] = []
        last_chained = 0.0
        while not self._stop.is_set():
            # Woken by the clock, not by each record: a thread woken for every record
            # would take the interpreter from the event loop thousands of times a second.
            self._wake.wait(WRITE_EVERY)
            self._wake.clear()
            markers += self._drain()
            due = bool(markers) or time.monotonic() - last_chained >= CHAIN_EVERY
            if not self._store_waiting(chain_stored=due):
                self._stop.wait(RETRY_SECONDS)
                continue
            if due:
                last_chained = time.monotonic()
            for marker in markers:
                marker.set()
            markers = []

    def _drain(self) -> list[threading.Event]:
        """Move queued records to `_waiting`; the flush markers met on the way."""
        markers: list[threading.Event] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return markers
            if isinstance(item, threading.Event):
                markers.append(item)
            else:
                recorded, status, etag, audit = item
                self._waiting.append(audit.closed_row(recorded, status, etag))

    def _store_waiting(self, chain_stored: bool) -> bool:
        """Store the waiting records, chained, and chain the rows writes stored (when
        asked, or when there is anything to store anyway): one transaction."""
        try:
            if not self._waiting and not (chain_stored and unchained_exists(self.db)):
                return True
            with self.db.write(notify=False) as conn:
                extend(conn, self._waiting)
        except Exception:  # noqa: BLE001 - kept and retried; requests see 503 past the limit
            log.exception("storing %d audit records failed; retrying", len(self._waiting))
            return False
        self._waiting.clear()
        return True


@contextmanager
def running_trail(db: Database) -> Iterator[AuditTrail]:
    trail = AuditTrail(db)
    trail.start()
    try:
        yield trail
    finally:
        trail.stop()
