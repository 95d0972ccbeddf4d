"""Delivery: each Subscription's handshake, events and heartbeats, sent to its endpoint.

A worker claims the Subscriptions that have something due (a lease on their row, taken
with SKIP LOCKED on PostgreSQL), and delivers each in a task of its own: a slow or hung
endpoint holds up its own Subscription and nothing else. Per Subscription, events go in
number order, up to its max count per notification; the next batch goes only once the
endpoint acknowledged the last (2xx). A failure keeps every event and retries, backing
off exponentially up to a cap, for as long as the Subscription is live; after
ATM_SUBSCRIPTION_ERROR_AFTER failures in a row its status is `error`, and the first
success makes it `active` again. A worker that dies mid-delivery leaves a lease that
expires; whoever claims it next sends the same events, with the same numbers, again
(at-least-once: receivers deduplicate by event number).

Every attempt is written to the audit trail, in the transaction that records its outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Connection, and_, or_, select, update

from gateway.audit.log import insert_rows
from gateway.errors import FhirError
from gateway.services.context import Context
from gateway.services.subscriptions import topic_includes
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from gateway.store.schema import subscription_events, subscriptions
from gateway.store.timeparse import now_micros
from gateway.subscriptions import notifications
from gateway.subscriptions.matcher import ACTOR, LIVE
from gateway.subscriptions.spec import Spec, check_endpoint, read_spec

log = logging.getLogger("atm.subscriptions")
MAX_AT_ONCE = 64  # Subscriptions one worker delivers side by side
ERROR_TEXT = 500  # characters of a failure kept in the row and the audit trail


@dataclass
class Step:
    """One notification about to be sent."""

    kind: str  # handshake | heartbeat | event-notification
    spec: Spec
    numbers: list[int]
    body: bytes
    entities: list[str]
    client_id: str | None
    organization: str | None


@dataclass
class Due:
    """What the next notification of a leased Subscription is to carry."""

    row: Any  # its subscriptions row, as the lease was renewed
    subscription: dict[str, Any]
    spec: Spec
    kind: str
    numbers: list[int]
    reader: notifications.Reader


@dataclass
class Outcome:
    ok: bool
    status: int | None
    error: str | None = None


class Deliverer:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._ctx = Context(db=db, settings=settings, base_url=settings.base_url or "",
                            actor=ACTOR)
        self._lease = int(settings.subscription_lease_seconds * 1_000_000)
        self._in_flight: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # -- the loop -----------------------------------------------------------------------------
    def nudge(self) -> None:
        """New events were made (from any thread): look for work now."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def serve(self, stop: threading.Event) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as http:
            while not stop.is_set():
                self._wake.clear()
                try:
                    claimed = await asyncio.to_thread(self.claim,
                                                      MAX_AT_ONCE - len(self._in_flight))
                except Exception:  # noqa: BLE001 - the database is away: try again soon
                    log.exception("claiming subscriptions to deliver failed; retrying")
                    claimed = []
                for subscription_id in claimed:
                    self._in_flight.add(subscription_id)
                    task = asyncio.create_task(self._deliver(http, subscription_id))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(),
                                           self.settings.subscription_poll_seconds)
            if tasks:  # let deliveries under way end (each is bounded by its timeout)
                await asyncio.wait(tasks, timeout=self.settings.subscription_timeout_seconds)
        await asyncio.to_thread(self.release_all)

    # -- claims ---------------------------------------------------------------------------------
    def claim(self, limit: int) -> list[str]:
        """Lease up to `limit` Subscriptions that have something due, not leased by anyone."""
        if limit <= 0:
            return []
        now = now_micros()
        c = subscriptions.c
        due = (select(c.id).where(
            c.status.in_(LIVE), c.next_attempt <= now, c.lease_until < now,
            or_(c.handshake.is_(False),
                and_(c.channel == "rest-hook",
                     or_(c.delivered < c.events, c.heartbeat_due <= now))))
            .order_by(c.next_attempt).limit(limit + len(self._in_flight)))
        with self.db.read() as conn:  # most looks find nothing: no write transaction then
            if not any(i not in self._in_flight for i in conn.execute(due).scalars()):
                return []
        with self.db.write(notify=False) as conn:
            if conn.dialect.name == "postgresql":
                due = due.with_for_update(skip_locked=True)
            ids = [i for i in conn.execute(due).scalars() if i not in self._in_flight][:limit]
            if ids:
                conn.execute(update(subscriptions).where(c.id.in_(ids))
                             .values(lease_owner=self.worker, lease_until=now + self._lease))
        return ids

    def release_all(self) -> None:
        """Hand back what this worker holds, so another need not wait for the leases to
        run out (if the database is away, they do run out)."""
        try:
            with self.db.write(notify=False) as conn:
                conn.execute(update(subscriptions)
                             .where(subscriptions.c.lease_owner == self.worker)
                             .values(lease_owner=None, lease_until=0))
        except Exception:  # noqa: BLE001 - stopping anyway
            log.warning("could not release this worker's subscriptions; their leases "
                        "will expire", exc_info=True)

    def _held(self, conn: Connection, subscription_id: str) -> Any:
        stmt = select(subscriptions).where(subscriptions.c.id == subscription_id,
                                           subscriptions.c.lease_owner == self.worker)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return conn.execute(stmt).first()

    def _release(self, conn: Connection, subscription_id: str, **values: Any) -> None:
        conn.execute(update(subscriptions).where(subscriptions.c.id == subscription_id,
                                                 subscriptions.c.lease_owner == self.worker)
                     .values(lease_owner=None, lease_until=0, **values))

    # -- one Subscription -------------------------------------------------------------------------
    async def _deliver(self, http: httpx.AsyncClient, subscription_id: str) -> None:
        try:
            step = await asyncio.to_thread(self.next_step, subscription_id)
            while step is not None:
                outcome = (Outcome(True, None) if step.spec.channel == "websocket"
                           else await self._send(http, step))
                step = await asyncio.to_thread(self.record, subscription_id, step, outcome)
        except Exception:  # noqa: BLE001 - the lease expires and another attempt follows
            log.exception("delivering Subscription/%s failed", subscription_id)
        finally:
            self._in_flight.discard(subscription_id)
            if self._wake is not None:  # events matched while it was in flight were
                self._wake.set()        # passed over by the claims: look again now

    def next_step(self, subscription_id: str) -> Step | None:
        """What to send next (renewing the lease), or None (lease released)."""
        with self.db.write(notify=False) as conn:
            due = self._decide(conn, subscription_id, now_micros())
        return self._render(due) if due is not None else None

    def _decide(self, conn: Connection, subscription_id: str, now: int) -> Due | None:
        """In the write transaction, which holds the lease: what is due, the lease renewed;
        None when nothing is (the lease then released)."""
        row = self._held(conn, subscription_id)
        if row is None:
            return None
        current = Repository(conn).read("Subscription", subscription_id)
        subscription = current.resource() if current and not current.deleted else None
        spec = _spec(subscription, self.settings)
        kind, numbers = self._due(row, now, spec.max_count if spec else 1)
        if kind == "heartbeat" and spec is not None and spec.ended(now):
            self._release(conn, subscription_id, heartbeat_due=None)  # its end has passed
            return None
        if subscription is not None and spec is None:  # e.g. its host left the allow-list
            self._release(conn, subscription_id, next_attempt=now + self._lease,
                          last_error="this Subscription can no longer be served as written")
            return None
        if kind is None or row.status not in LIVE or spec is None or subscription is None:
            self._release(conn, subscription_id)
            return None
        if spec.channel == "websocket" and kind != "handshake":
            self._release(conn, subscription_id)  # sent by the socket's own server
            return None
        reader = notifications.Reader.of_row(row, conn)
        if reader.disabled:
            self._release(conn, subscription_id, next_attempt=now + self._lease,
                          last_error="the subscribing client is disabled")
            return None
        conn.execute(update(subscriptions).where(subscriptions.c.id == subscription_id)
                     .values(lease_until=now + self._lease))
        return Due(row, subscription, spec, kind, numbers, reader)

    def _render(self, due: Due) -> Step:
        """The notification, built in a read transaction: on SQLite, rendering inside the
        write transaction kept every other writer (clients' creates) waiting."""
        row = due.row
        with self.db.read() as conn:
            repo = Repository(conn)
            events = conn.execute(
                select(subscription_events).where(
                    subscription_events.c.subscription_id == row.id,
                    subscription_events.c.number.in_(due.numbers))
                .order_by(subscription_events.c.number)).all() if due.numbers else []
            ctx = self._ctx.within(conn)
            bundle = notifications.notification(repo, ctx, due.subscription, row, due.kind,
                                                events, due.spec.content, due.reader,
                                                topic_includes(ctx, repo, row.topic))
        entities = [f"Subscription/{row.id}"] + [
            f"{e.res_type}/{e.res_id}/_history/{e.version}" for e in events]
        return Step(due.kind, due.spec, due.numbers, notifications.body(bundle, due.reader),
                    entities, row.client_id, row.organization)

    @staticmethod
    def _due(row: Any, now: int, max_count: int) -> tuple[str | None, list[int]]:
        """The kind of notification due, and the event numbers it carries."""
        if not row.handshake:
            return "handshake", []
        if row.channel != "rest-hook":
            return None, []
        if row.delivered < row.events:
            last = min(row.events, row.delivered + max_count)
            return "event-notification", list(range(row.delivered + 1, last + 1))
        if row.heartbeat_due is not None and row.heartbeat_due <= now:
            return "heartbeat", []
        return None, []

    async def _send(self, http: httpx.AsyncClient, step: Step) -> Outcome:
        assert step.spec.endpoint is not None
        try:
            check_endpoint(step.spec.endpoint, self.settings)  # the allow-list may have shrunk
        except FhirError as exc:
            return Outcome(False, None, exc.diagnostics)
        headers = {"Content-Type": "application/fhir+json", **dict(step.spec.headers)}
        try:
            response = await asyncio.wait_for(
                http.post(step.spec.endpoint, content=step.body, headers=headers,
                          timeout=step.spec.timeout), step.spec.timeout + 1)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return Outcome(False, None, (f"{type(exc).__name__}: {exc}")[:ERROR_TEXT])
        if 200 <= response.status_code < 300:
            return Outcome(True, response.status_code)
        return Outcome(False, response.status_code, f"the endpoint answered HTTP "
                                                    f"{response.status_code}")

    def record(self, subscription_id: str, step: Step, outcome: Outcome) -> Step | None:
        """Store how the attempt went (and its audit row) and, after a success, decide the
        next step in the same transaction; None when there is nothing more to do now."""
        now = now_micros()
        with self.db.write(notify=False) as conn:
            row = self._held(conn, subscription_id)
            if row is None:
                return None  # the lease ran out and another worker took over
            if row.status not in LIVE:  # turned off while this was sent: it stays off
                self._release(conn, subscription_id)
                insert_rows(conn, [audit_row(now, subscription_id, step, outcome)])
                return None
            if outcome.ok:
                heartbeat = step.spec.heartbeat
                values: dict[str, Any] = {
                    "handshake": True, "failures": 0, "next_attempt": 0, "last_sent": now,
                    "heartbeat_due": now + heartbeat * 1_000_000 if heartbeat else None,
                    "last_error": None, "status": "active", "lease_until": now + self._lease}
                if step.numbers:
                    values["delivered"] = max(row.delivered, step.numbers[-1])
                conn.execute(update(subscriptions).where(subscriptions.c.id == subscription_id)
                             .values(**values))
                status = "active"
            else:
                failures = row.failures + 1
                status = "error" if (failures >= self.settings.subscription_error_after
                                     or step.kind == "handshake") else row.status
                self._release(conn, subscription_id, failures=failures, status=status,
                              next_attempt=now + self._backoff(failures),
                              last_error=outcome.error)
            if status != row.status:
                _set_status(conn, subscription_id, status)
            insert_rows(conn, [audit_row(now, subscription_id, step, outcome)])
            due = self._decide(conn, subscription_id, now) if outcome.ok else None
        return self._render(due) if due is not None else None

    def _backoff(self, failures: int) -> int:
        base = self.settings.subscription_retry_seconds
        seconds = min(self.settings.subscription_retry_max_seconds,
                      base * 2 ** min(failures - 1, 30))
        return int(seconds * random.uniform(0.9, 1.0) * 1_000_000)  # noqa: S311 - jitter


def audit_row(now: int, subscription_id: str, step: Step, outcome: Outcome) -> tuple[Any, ...]:
    """A ROW_COLUMNS row: the server sent a notification (DICOM Export), to a rest-hook
    endpoint or over a websocket (gateway/subscriptions/websocket.py)."""
    endpoint = step.spec.endpoint or ""
    parts = urlsplit(endpoint)
    where = f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else "websocket"
    return (now, "notify", step.kind, "E", "0" if outcome.ok else "8", outcome.status,
            step.client_id, step.organization, parts.hostname, None, "POST", where,
            outcome.error, f"Subscription/{subscription_id}", " ".join(step.entities))


def _spec(subscription: dict[str, Any] | None, settings: Settings) -> Spec | None:
    if subscription is None:
        return None
    try:
        return read_spec(subscription, settings)
    except FhirError as exc:
        log.warning("Subscription/%s cannot be delivered: %s", subscription.get("id"), exc)
        return None


def _set_status(conn: Connection, subscription_id: str, status: str) -> None:
    """The Subscription resource shows the status delivery gave it (a new version)."""
    repo = Repository(conn, ACTOR)
    current = repo.read("Subscription", subscription_id)
    if current is None or current.deleted:
        return
    resource = current.resource()
    if resource.get("status") == status or resource.get("status") == "off":
        return
    resource["status"] = status
    with contextlib.suppress(FhirError):  # a client changed it meanwhile: matching follows
        repo.update(resource, subscription_id, expected_version=current.version)
