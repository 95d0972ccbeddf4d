"""The websocket channel of topic-based Subscriptions (Subscriptions Backport IG):
https://hl7.org/fhir/uv/subscriptions-backport/STU1.1/channels.html#websockets

A client asks `Subscription/{id}/$get-ws-binding-token`, opens the websocket its answer
names (/fhir/$subscription-ws) and sends `bind-with-token <token>`. The server answers
with a `handshake` notification, then sends the Subscription's new events as
`event-notification`s (in number order, without gaps, up to its max count in each) and a
`heartbeat` whenever its heartbeat period passes with nothing sent. Notifications are
text frames, each audited as delivery's are. A token unknown or expired, or a message
that is not a bind, is answered with an OperationOutcome and the socket is closed (1008).

- A token binds any number of sockets until it expires: a client whose socket dropped
  binds again without asking for another. It is checked only when binding; the binding
  lasts as long as the socket, or until the Subscription is turned off or deleted. One
  socket may bind several Subscriptions, one token each.
- Nothing is acknowledged over a websocket, so the delivery row's `delivered` is not
  moved: each socket keeps its own place, several sockets may follow one Subscription,
  and a stream starts after the events the Subscription had when it was bound (earlier
  ones, and any sent while no socket was bound, are for `$events`).
- A socket carries what the Subscription's client may read (notifications.Reader), as
  its rest-hook endpoint would; a disabled client's sockets are closed.
- One Watcher per application reads the delivery rows of every Subscription bound here
  in one query, after each commit of this process (`db.committed`: events matched here)
  and every ATM_SUBSCRIPTION_POLL_SECONDS (events matched by `atm worker` processes), and
  wakes the streams whose Subscription changed: idle streams make no reads of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from gateway import jsonio
from gateway.audit.log import insert_rows
from gateway.errors import FhirError, Issue, operation_outcome
from gateway.services.context import Context
from gateway.services.subscriptions import topic_includes
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Repository
from gateway.store.schema import subscription_events, subscription_ws_tokens, subscriptions
from gateway.store.timeparse import now_micros
from gateway.subscriptions import notifications
from gateway.subscriptions.delivery import Outcome, Step, audit_row
from gateway.subscriptions.matcher import ACTOR, LIVE
from gateway.subscriptions.spec import Spec, read_spec

log = logging.getLogger("atm.subscriptions")
BIND = "bind-with-token"
BIND_SECONDS = 30.0  # an opened socket that binds nothing in this time is closed
READY_SECONDS = 10.0  # how long a Subscription just created may take to get its row
NORMAL, POLICY, SERVER_ERROR, TRY_LATER = 1000, 1008, 1011, 1013  # close codes
REASON_BYTES = 123  # the most a close frame's reason may hold
GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)  # sending to a closed socket


class Ended(Exception):
    """Why a socket closes: told to the client as an OperationOutcome, then the close code."""

    def __init__(self, reason: str, code: int = POLICY, issue: str = "security",
                 severity: str = "error") -> None:
        super().__init__(reason)
        self.reason, self.code, self.issue, self.severity = reason, code, issue, severity


class Gone(Exception):
    """The client closed its socket: nothing more can be sent or said."""


def token_subscription(db: Database, token: str) -> str | None:
    """The Subscription a binding token was issued for, while the token lasts (stored as
    its SHA-256 by $get-ws-binding-token). It binds as often as it is shown until then:
    a client whose socket dropped binds again without asking for another."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    tokens = subscription_ws_tokens.c
    with db.read() as conn:
        found = conn.execute(select(tokens.subscription_id).where(
            tokens.token_hash == digest, tokens.expires_at > now_micros())).scalar()
    return None if found is None else str(found)


class Stream:
    """One Subscription followed on one socket: its place, and what it sends next."""

    def __init__(self, db: Database, settings: Settings, base_url: str,
                 subscription_id: str) -> None:
        self.db, self.settings, self.subscription_id = db, settings, subscription_id
        self.news = asyncio.Event()  # set by the Watcher when the Subscription changed
        self.position: int | None = None  # the last event number sent; None: no handshake
        self.heartbeat: int | None = None  # seconds, as the Subscription asks
        self.last_sent = time.monotonic()
        self._seen: tuple[Any, ...] | None = None  # (events, version, status) last read
        self._sending: set[asyncio.Task[bool]] = set()
        self._ctx = Context(db=db, settings=settings, base_url=base_url, actor=ACTOR)

    def saw(self, row: Any) -> None:
        """The Watcher's reading of the delivery row: wake when it differs from ours."""
        if row is not None and (row.events, row.version, row.status) != self._seen:
            self.news.set()

    async def run(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Handshake, then events and heartbeats until the Subscription ends (Ended), the
        client goes (Gone) or the task is cancelled (the socket closed)."""
        ready_by = time.monotonic() + READY_SECONDS
        while True:
            self.news.clear()  # before reading: news while we read wakes the wait below
            step = await asyncio.to_thread(self.next_step, self._heartbeat_due())
            if step is not None:
                await self._send(send, step)
                continue
            if self.position is None and time.monotonic() > ready_by:
                raise Ended(f"Subscription/{self.subscription_id} is not being matched yet; "
                            "bind again shortly", TRY_LATER, "transient")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.news.wait(), self._wait_seconds(ready_by))

    async def _send(self, send: Callable[[bytes], Awaitable[None]], step: Step) -> None:
        """Send one notification and audit it, in a task of its own: the stream may be
        cancelled meanwhile (its socket closed), and what was handed to the socket is
        audited all the same. Gone when the client did not take it."""
        task = asyncio.create_task(self._send_audited(send, step))
        self._sending.add(task)  # held until done: a shielded task must be referenced
        task.add_done_callback(self._sending.discard)
        if not await asyncio.shield(task):
            raise Gone

    async def _send_audited(self, send: Callable[[bytes], Awaitable[None]],
                            step: Step) -> bool:
        try:
            await send(step.body)
        except Gone:
            await asyncio.to_thread(self.audit, step, Outcome(
                False, None, "the websocket closed before the notification was sent"))
            return False
        self.last_sent = time.monotonic()
        await asyncio.to_thread(self.audit, step, Outcome(True, None))
        return True

    def _heartbeat_due(self) -> bool:
        return (self.position is not None and self.heartbeat is not None
                and time.monotonic() - self.last_sent >= self.heartbeat)

    def _wait_seconds(self, ready_by: float) -> float | None:
        """How long to wait for news: until the next heartbeat is due (None: no limit)."""
        if self.position is None:
            return max(0.0, ready_by - time.monotonic())
        if self.heartbeat is None:
            return None
        return max(0.0, self.last_sent + self.heartbeat - time.monotonic())

    # -- in a thread ----------------------------------------------------------------------
    def next_step(self, heartbeat_due: bool) -> Step | None:
        """The notification to send now, None for none yet; Ended when the stream is over.
        The stream's place moves as the notification is built: it is sent next, or the
        stream ends."""
        with self.db.read() as conn:
            repo = Repository(conn)
            current = repo.read("Subscription", self.subscription_id)
            if current is None or current.deleted:
                raise Ended(f"Subscription/{self.subscription_id} was deleted", NORMAL,
                            "informational", "information")
            row = conn.execute(select(subscriptions).where(
                subscriptions.c.id == self.subscription_id)).first()
            if row is None:
                return None  # matching has not seen it yet
            self._seen = (row.events, row.version, row.status)
            subscription = current.resource()
            spec = self._spec(subscription, row)
            self.heartbeat = spec.heartbeat
            reader = notifications.Reader.of_row(row, conn)
            if reader.disabled:
                raise Ended("The subscribing client is disabled")
            kind, numbers = self._due(row, spec, heartbeat_due)
            if kind is None:
                return None
            events = conn.execute(
                select(subscription_events).where(
                    subscription_events.c.subscription_id == self.subscription_id,
                    subscription_events.c.number.between(numbers[0], numbers[-1]))
                .order_by(subscription_events.c.number)).all() if numbers else []
            ctx = self._ctx.within(conn)
            bundle = notifications.notification(repo, ctx, subscription, row, kind, events,
                                                spec.content, reader,
                                                topic_includes(ctx, repo, row.topic))
        entities = [f"Subscription/{self.subscription_id}"] + [
            f"{e.res_type}/{e.res_id}/_history/{e.version}" for e in events]
        return Step(kind, spec, numbers, notifications.body(bundle, reader), entities,
                    row.client_id, row.organization)

    def _spec(self, subscription: dict[str, Any], row: Any) -> Spec:
        """The Subscription's delivery settings, while it is a live websocket one."""
        name = f"Subscription/{self.subscription_id}"
        if row.status not in LIVE:
            raise Ended(f"{name} is {row.status}", NORMAL, "informational", "information")
        try:
            spec = read_spec(subscription, self.settings)
        except FhirError as exc:
            raise Ended(f"{name} cannot be served: {exc.diagnostics}", NORMAL,
                        "processing") from exc
        if spec.channel != "websocket":
            raise Ended(f"{name} is no longer a websocket Subscription", NORMAL,
                        "informational", "information")
        return spec

    def _due(self, row: Any, spec: Spec, heartbeat_due: bool) -> tuple[str | None, list[int]]:
        """The kind of notification due and the event numbers it carries; moves the place."""
        if self.position is None:
            self.position = row.events  # earlier events are for $events
            return "handshake", []
        if row.events > self.position:
            last = min(row.events, self.position + spec.max_count)
            numbers = list(range(self.position + 1, last + 1))
            self.position = last
            return "event-notification", numbers
        if heartbeat_due and not spec.ended(now_micros()):
            return "heartbeat", []
        return None, []

    def audit(self, step: Step, outcome: Outcome) -> None:
        with self.db.write(notify=False) as conn:
            insert_rows(conn, [audit_row(now_micros(), self.subscription_id, step, outcome)])


class Watcher:
    """Wakes the streams bound in this process when their Subscriptions change: one query
    for all of them after each commit here and every poll interval, not one per stream.
    It runs while any stream is bound."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._committed = db.committed.listen()
        self._streams: dict[str, set[Stream]] = {}
        self._task: asyncio.Task[None] | None = None

    def join(self, stream: Stream) -> None:
        self._streams.setdefault(stream.subscription_id, set()).add(stream)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch())

    def leave(self, stream: Stream) -> None:
        bound = self._streams.get(stream.subscription_id, set())
        bound.discard(stream)
        if not bound:
            self._streams.pop(stream.subscription_id, None)
        if not self._streams:
            self._committed.set()  # the watch ends now, not after its wait (a shutdown waits)

    async def _watch(self) -> None:
        poll = self.settings.subscription_poll_seconds
        while self._streams:
            self._committed.clear()  # before reading: a commit after it wakes the wait
            try:
                rows = await asyncio.to_thread(self._rows, list(self._streams))
            except Exception:  # noqa: BLE001 - the database is away: look again soon
                log.exception("reading the websocket Subscriptions' rows failed; retrying")
                rows = {}
            for subscription_id, row in rows.items():
                for stream in list(self._streams.get(subscription_id, ())):
                    stream.saw(row)
            await asyncio.to_thread(self._committed.wait, poll)

    def _rows(self, ids: list[str]) -> dict[str, Any]:
        c = subscriptions.c
        with self.db.read() as conn:
            return {row.id: row for row in conn.execute(
                select(c.id, c.events, c.version, c.status).where(c.id.in_(ids)))}


class Session:
    """One socket: the client's binds, the streams they started, and the frames sent on
    it (one at a time). A stream's end closes the socket; the client's closing ends them."""

    def __init__(self, websocket: WebSocket, watcher: Watcher, base_url: str) -> None:
        self.websocket, self.watcher, self.base_url = websocket, watcher, base_url
        self._sending = asyncio.Lock()
        self._closed = False
        self._streams: dict[str, asyncio.Task[None]] = {}
        self._listening: asyncio.Task[None] | None = None

    async def run(self) -> None:
        await self.websocket.accept()
        self._listening = asyncio.create_task(self._listen())
        try:
            await asyncio.wait([self._listening])  # cancelled by a stream that ended
        finally:
            tasks = [self._listening, *self._streams.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(self) -> None:
        """The client's messages until it goes, or one is late or not a good bind."""
        while True:
            try:
                message = await asyncio.wait_for(self.websocket.receive(),
                                                 None if self._streams else BIND_SECONDS)
            except TimeoutError:
                await self.close(Ended(f"Send `{BIND} <token>` within {BIND_SECONDS:g} "
                                       "seconds of connecting"))
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text") or (message.get("bytes") or b"").decode(errors="replace")
            try:
                await self._bind(text)
            except Ended as end:
                await self.close(end)
                return

    async def _bind(self, text: str) -> None:
        command, _, token = text.strip().partition(" ")
        if command != BIND or not token.strip():
            raise Ended(f"Send `{BIND} <token>`, with a token from "
                        "Subscription/{id}/$get-ws-binding-token", issue="invalid")
        subscription_id = await asyncio.to_thread(token_subscription, self.watcher.db,
                                                  token.strip())
        if subscription_id is None:
            raise Ended("The binding token is unknown or has expired: ask "
                        "Subscription/{id}/$get-ws-binding-token for another")
        if subscription_id not in self._streams:  # bound already: one stream is enough
            stream = Stream(self.watcher.db, self.watcher.settings, self.base_url,
                            subscription_id)
            self._streams[subscription_id] = asyncio.create_task(self._follow(stream))

    async def _follow(self, stream: Stream) -> None:
        """Run one stream; however it ends, the socket closes (saying why, if it can)."""
        self.watcher.join(stream)
        try:
            await stream.run(self.send)
        except Gone:
            pass
        except Ended as end:
            await self.close(end)
        except Exception:  # noqa: BLE001 - the client hears of it and may bind again
            log.exception("the websocket stream of Subscription/%s failed",
                          stream.subscription_id)
            await self.close(Ended("The server could not go on with this stream: bind "
                                   "again, and catch up with $events", SERVER_ERROR,
                                   "exception"))
        finally:
            self.watcher.leave(stream)
        if self._listening is not None:
            self._listening.cancel()

    async def send(self, body: bytes) -> None:
        """One text frame; Gone when the socket has closed."""
        async with self._sending:
            if self._closed:
                raise Gone
            try:
                await self.websocket.send_text(body.decode())
            except GONE as exc:
                self._closed = True
                raise Gone from exc

    async def close(self, end: Ended) -> None:
        """Tell the client why (an OperationOutcome), then close with the end's code."""
        outcome = operation_outcome([Issue(end.issue, end.reason, end.severity)])
        reason = end.reason.encode()[:REASON_BYTES].decode(errors="ignore")
        async with self._sending:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(*GONE):
                await self.websocket.send_text(jsonio.dumps(outcome).decode())
                await self.websocket.close(end.code, reason)
