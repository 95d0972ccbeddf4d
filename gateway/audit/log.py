"""The audit log's storage and its writer thread.

`insert_events` stores records inside a caller's transaction (a write's own record).
`AuditTrail` takes every other record from the request path (a queue put, no database
work) and stores them in batches from one background thread, which also chains newly
stored rows behind their predecessors (gateway/audit/chain.py) a fraction of a second
later. If the database refuses, records wait in memory and are retried; past
MAX_WAITING, requests are refused (503) rather than served unrecorded.
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

from gateway.audit.chain import seal
from gateway.audit.events import Event, RequestAudit
from gateway.errors import FhirError
from gateway.store.database import Database
from gateway.store.driver import Driver
from gateway.store.schema import audit_entities, audit_log

log = logging.getLogger(__name__)
BATCH = 500  # most records stored in one transaction
WRITE_EVERY = 0.05  # seconds the writer waits for more records before storing a batch
CHAIN_EVERY = 0.25  # seconds between chaining rounds
MAX_WAITING = 100_000  # records held in memory while the database cannot take them
RETRY_SECONDS = 1.0

_COLUMNS = tuple(c.name for c in audit_log.columns if c.name not in ("seq", "chain_seq",
                                                                      "hash"))


class AuditUnavailableError(FhirError):
    """The audit trail cannot keep up (the database is refusing writes)."""

    status, code = 503, "transient"


@cache
def _statements(dialect: str) -> tuple[str, str]:
    mark = "?" if dialect == "sqlite" else "%s"
    row = (f"INSERT INTO {audit_log.name} ({', '.join(_COLUMNS)}) VALUES "
           f"({', '.join([mark] * len(_COLUMNS))}) RETURNING seq")
    entity = f"INSERT INTO {audit_entities.name} (reference, seq) VALUES ({mark}, {mark})"
    return row, entity


def _unversioned(reference: str) -> str:
    return "/".join(reference.split("/")[:2])


def insert_events(conn: Any, events: Sequence[Event]) -> None:
    """Store records in the caller's transaction (on the driver, like the write path)."""
    driver = Driver(conn)
    insert_row, insert_entity = _statements(conn.dialect.name)
    entity_rows: list[tuple[str, int]] = []
    for event in events:
        values = (event.recorded, event.event_type, event.subtype, event.action,
                  event.outcome, event.status, event.client_id, event.organization,
                  event.address, event.request_id, event.method, event.path, event.query,
                  " ".join(event.entities) or None)
        seq = driver.execute(insert_row, values).fetchone()[0]
        entity_rows.extend({(_unversioned(ref), seq) for ref in event.entities})
    if entity_rows:
        driver.execute_many(insert_entity, entity_rows)


class AuditTrail:
    """The records of requests that did not write: queued here, stored by one thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: queue.SimpleQueue[Event | threading.Event] = queue.SimpleQueue()
        self._waiting: list[Event] = []  # taken from the queue, not yet stored
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_chain = 0.0

    # -- the request path ---------------------------------------------------------------
    def begin(self, method: str, path: str, query: str | None, address: str | None,
              request_id: str | None, event_type: str = "rest") -> RequestAudit:
        return RequestAudit(self.put, method, path, query, address, request_id, event_type)

    def put(self, event: Event) -> None:
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
        self._queue.put(threading.Event())  # wakes the writer
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None
        self._drain(block=False)
        self._store_waiting()
        self._chain()

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every record queued before the call is stored and chained."""
        if self._thread is None:
            self._drain(block=False)
            self._store_waiting()
            self._chain()
            return
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout):
            raise TimeoutError("the audit writer did not catch up")

    def _run(self) -> None:
        markers: list[threading.Event] = []
        while not self._stop.is_set():
            markers += self._drain(block=True)
            stored = self._store_waiting()
            if markers or time.monotonic() - self._last_chain >= CHAIN_EVERY:
                self._chain()  # rows stored with their writes are chained here too
            if not stored:
                self._stop.wait(RETRY_SECONDS)
                continue
            for marker in markers:
                marker.set()
            markers = []

    def _drain(self, *, block: bool) -> list[threading.Event]:
        """Move queued records to `_waiting` (waiting up to WRITE_EVERY for the first)."""
        markers: list[threading.Event] = []
        deadline = time.monotonic() + WRITE_EVERY
        while len(self._waiting) < BATCH:
            timeout = deadline - time.monotonic()
            try:
                item = (self._queue.get(timeout=timeout) if block and timeout > 0
                        else self._queue.get_nowait())
            except queue.Empty:
                break
            if isinstance(item, threading.Event):
                markers.append(item)
                block = False  # someone waits: store what is here now
            else:
                self._waiting.append(item)
        return markers

    def _store_waiting(self) -> bool:
        if not self._waiting:
            return True
        try:
            with self.db.write() as conn:
                insert_events(conn, self._waiting)
        except Exception:  # noqa: BLE001 - kept and retried; requests see 503 past the limit
            log.exception("storing %d audit records failed; retrying", len(self._waiting))
            return False
        self._waiting.clear()
        return True

    def _chain(self) -> None:
        self._last_chain = time.monotonic()
        try:
            while seal(self.db) > 0:
                pass
        except Exception:  # noqa: BLE001 - the next round chains what this one could not
            log.exception("chaining the audit log failed; retrying")


@contextmanager
def running_trail(db: Database) -> Iterator[AuditTrail]:
    trail = AuditTrail(db)
    trail.start()
    try:
        yield trail
    finally:
        trail.stop()
