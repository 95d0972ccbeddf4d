"""Notifications under load: Subscriptions' rest-hook deliveries to real HTTP receivers.

`python -m bench.notify SPEC.json` starts `subscribers` HTTP servers on 127.0.0.1 (one
port each, asyncio streams in this process), subscribes each to topic task-status (a
rest-hook Subscription with id-only payloads; with `filter`, only to Tasks of an owner
that this run's Tasks alone have) and waits for every handshake. Then two phases:

- light: `light` Tasks created one at a time, each once every receiver has the last
  one's event: latency from commit to receipt with no queue;
- burst: `events` Tasks created through `concurrency` keep-alive connections as fast as
  the server takes them; then it waits until every receiver has every event (or
  `timeout` passes, or nothing arrives for `stall` seconds).

It prints one JSON object: the burst's writes (req/s, response latency); its delivery
(events received per second over all receivers, from the first write to the last event
received; latency from commit to receipt per (subscriber, event)); the light phase's
latency; and the check that every subscriber got events 1..L+N, each once, each about
one of this run's Tasks, each Task once. Events missing after the timeout, duplicated
or unexpected are errors.

Commit time is the created Task's `meta.lastUpdated` from the server's 201: the server
stamps it in the transaction, just before its commit, from its wall clock truncated to
the millisecond. Receipt time is `time.time()` in the receiver as soon as a
notification's body has been read. Both read this machine's realtime clock (the server
and the benchmark share it), so their difference is meaningful; the truncation makes it
at most 1 ms too long. The 201's arrival at the writer (later than the commit by the
response's trip and by any wait in this process) gives a second, shorter figure,
reported beside it (`after_response_*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench import workload
from bench.loadgen import (
    CONNECT_TIMEOUT,
    RESPONSE_TIMEOUT,
    encode,
    percentile_ms,
    read_body,
    read_response,
    run_pinned,
)

TOPIC = "https://atm-gateway.org/fhir/SubscriptionTopic/task-status"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FOCUS = re.compile(r"(?:^|/)Task/([^/]+)/_history/\d+$")
HANDSHAKE_SECONDS = 120.0
"""How long the Subscriptions may take to be active (matching may have a backlog of the
scenarios before to pass first)."""
SETTLE_SECONDS = 1.0
"""After the last event, how long receivers keep listening for duplicates."""


@dataclass
class Spec:
    base_url: str
    """http://127.0.0.1:PORT/fhir"""
    subscribers: int = 10
    events: int = 2000
    """Tasks created in the burst: each is one event for every subscriber."""
    light: int = 0
    """Tasks created one at a time before the burst."""
    concurrency: int = 16
    timeout: float = 600.0
    """The longest the burst's events may take to arrive, from its first write."""
    stall: float = 60.0
    """Give up sooner when no event arrived for this long."""
    max_count: int | None = None
    """backport-max-count of each Subscription (None: the server's default)."""
    filter: bool = False
    """Subscribe with a filter (Task?owner=<this run's owner>), which the server tests on
    every Task change for every Subscription. Without one, any other Task written
    meanwhile is an event too, reported as unexpected (the benchmark writes none then)."""
    cpu: int | None = None
    credentials: dict[str, Any] | None = None
    """A client's credentials (Credentials.to_json) when the server asks for tokens."""


# -- receivers --------------------------------------------------------------------------
@dataclass
class Notification:
    at: float  # time.time() on arrival
    kind: str  # handshake | heartbeat | event-notification
    events: list[tuple[int, str]]  # (event number, focus reference)


@dataclass
class Receiver:
    """One subscriber's endpoint: an HTTP/1.1 server that answers 200 to every POST and
    keeps what came, stamped on arrival."""

    number: int
    port: int = 0
    received: list[Notification] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    numbers: set[int] = field(default_factory=set)  # distinct event numbers so far
    tasks: set[str] = field(default_factory=set)  # Task ids the events were about
    last_event_at: float = 0.0
    arrival: asyncio.Event | None = None  # set on every notification with events
    server: asyncio.Server | None = None
    open: dict[asyncio.StreamWriter, asyncio.Task[Any]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/hook/{self.number}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and end the connections the gateway keeps open (each handler
        then sees its stream end and returns)."""
        if self.server is not None:
            self.server.close()
        for writer in list(self.open):
            writer.close()
        await asyncio.gather(*self.open.values(), return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.open[writer] = task
        try:
            while True:
                try:
                    body = await read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the connection was closed, by the gateway or by stop()
                at = time.time()  # receipt, before anything else is done with it
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                self._keep(at, body)
        finally:
            del self.open[writer]
            writer.close()

    def _keep(self, at: float, body: bytes) -> None:
        try:
            note = parse_notification(at, body)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            if len(self.unreadable) < 5:
                self.unreadable.append(f"{exc!r}: {body[:200]!r}")
            return
        self.received.append(note)
        if not note.events:
            return
        for number, focus in note.events:
            self.numbers.add(number)
            match = FOCUS.search(focus)
            if match:
                self.tasks.add(match.group(1))
        self.last_event_at = at
        if self.arrival is not None:
            self.arrival.set()

    def handshakes(self) -> int:
        return sum(1 for n in self.received if n.kind == "handshake")


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    return await read_body(reader, head.decode("latin-1").split("\r\n")[1:])


def parse_notification(at: float, body: bytes) -> Notification:
    """A notification Bundle's type and events (Subscriptions Backport IG, R4)."""
    bundle = orjson.loads(body)
    status = bundle["entry"][0]["resource"]
    kind, events = "", []
    for parameter in status["parameter"]:
        if parameter["name"] == "type":
            kind = parameter["valueCode"]
        elif parameter["name"] == "notification-event":
            parts = {p["name"]: p for p in parameter["part"]}
            focus = parts["focus"]["valueReference"]["reference"] if "focus" in parts else ""
            events.append((int(parts["event-number"]["valueString"]), focus))
    return Notification(at, kind, events)


# -- the gateway's FHIR API -------------------------------------------------------------
class Connection:
    """One keep-alive HTTP/1.1 connection to the gateway (raw streams, as bench.loadgen)."""

    def __init__(self, host: str, port: int, prefix: str, authorization: str) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.authorization = authorization
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, method: str, path: str,
                   body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT)
        reader, writer = self._streams
        writer.write(encode(self.host, self.port, method, self.prefix + path,
                            orjson.dumps(body) if body is not None else None,
                            self.authorization))
        return await asyncio.wait_for(read_response(reader), RESPONSE_TIMEOUT)

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def subscription(endpoint: str, owner: str | None, max_count: int | None) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": BACKPORT + "backport-payload-content",
                                    "valueCode": "id-only"}]}}
    if max_count is not None:
        channel["extension"] = [{"url": BACKPORT + "backport-max-count",
                                 "valuePositiveInt": max_count}]
    resource = {"resourceType": "Subscription", "status": "requested",
                "reason": "bench.notify", "criteria": TOPIC, "channel": channel}
    if owner is not None:
        resource["_criteria"] = {"extension": [{"url": BACKPORT + "backport-filter-criteria",
                                                "valueString": f"Task?owner={owner}"}]}
    return resource


def instant_seconds(text: str) -> float:
    from gateway.store.timeparse import date_range

    parsed = date_range(text)
    if parsed is None:
        raise ValueError(f"not an instant: {text!r}")
    return parsed[0] / 1_000_000


# -- the run -------------------------------------------------------------------------------
@dataclass
class Write:
    task_id: str
    committed: float  # meta.lastUpdated, epoch seconds (server clock, ms)
    answered: float  # time.time() when the 201 arrived


@dataclass
class Phase:
    """One phase's Task creates."""

    name: str
    writes: list[Write] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, each write's response
    errors: int = 0
    failures: list[str] = field(default_factory=list)
    started: float = 0.0  # time.time() of the first request sent
    finished: float = 0.0  # time.time() of the last response
    last_event: float = 0.0  # time.time() of the last of its events received

    def fail(self, why: str) -> None:
        self.errors += 1
        if len(self.failures) < 5:
            self.failures.append(f"{self.name}: {why}")


class Bench:
    def __init__(self, spec: Spec, token: Callable[[], str]) -> None:
        parts = urlsplit(spec.base_url)
        assert parts.hostname and parts.port
        self.spec, self.host, self.port = spec, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.owner = f"Organization/bench-notify-{uuid.uuid4().hex[:12]}"
        self.task = workload.new_task() | {"status": "requested",
                                           "owner": {"reference": self.owner}}
        self.receivers = [Receiver(n) for n in range(spec.subscribers)]
        self.subscriptions: list[str] = []
        self.active_after = 0.0  # seconds from the first Subscription's POST to all active
        self.failures: list[str] = []

    async def connection(self) -> Connection:
        authorization = await asyncio.to_thread(self.token)
        return Connection(self.host, self.port, self.prefix, authorization)

    async def subscribe(self) -> None:
        api = await self.connection()
        started = time.monotonic()
        try:
            for receiver in self.receivers:
                endpoint = f"http://127.0.0.1:{receiver.port}{receiver.path}"
                status, body = await api.call("POST", "/Subscription", subscription(
                    endpoint, self.owner if self.spec.filter else None, self.spec.max_count))
                if status != 201:
                    raise RuntimeError(f"creating a Subscription answered {status}: "
                                       f"{body[:300]!r}")
                self.subscriptions.append(orjson.loads(body)["id"])
            deadline = time.monotonic() + HANDSHAKE_SECONDS
            for receiver, subscription_id in zip(self.receivers, self.subscriptions,
                                                 strict=True):
                while True:  # the handshake, then `active` (recorded once it was answered)
                    status, body = await api.call("GET", f"/Subscription/{subscription_id}")
                    if (receiver.handshakes() and status == 200
                            and orjson.loads(body).get("status") == "active"):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"Subscription/{subscription_id} not active after "
                            f"{HANDSHAKE_SECONDS:g} s ({receiver.handshakes()} handshakes, "
                            f"last status {status}: {body[:300]!r})")
                    await asyncio.sleep(0.05)
            self.active_after = time.monotonic() - started
        finally:
            api.close()

    async def unsubscribe(self) -> None:
        api = await self.connection()
        try:
            for subscription_id in self.subscriptions:
                status, body = await api.call("DELETE", f"/Subscription/{subscription_id}")
                if status not in (200, 204):
                    self.failures.append(f"DELETE Subscription/{subscription_id}: {status} "
                                         f"{body[:200]!r}")
        finally:
            api.close()

    async def create(self, api: Connection, phase: Phase) -> Write | None:
        begun = time.perf_counter()
        status, payload = await api.call("POST", "/Task", self.task)
        answered = time.time()
        phase.finished = max(phase.finished, answered)
        if status != 201:
            phase.fail(f"POST Task -> {status} {payload[:200]!r}")
            return None
        phase.latencies.append(time.perf_counter() - begun)
        task = orjson.loads(payload)
        write = Write(task["id"], instant_seconds(task["meta"]["lastUpdated"]), answered)
        phase.writes.append(write)
        return write

    async def light(self) -> Phase:
        """One create at a time, the next once every receiver has the last one's event."""
        phase, arrival = Phase("light"), asyncio.Event()
        for receiver in self.receivers:
            receiver.arrival = arrival
        api = await self.connection()
        phase.started = time.time()
        try:
            for _ in range(self.spec.light):
                write = await self.create(api, phase)
                if write is None:
                    continue
                deadline = time.monotonic() + self.spec.stall
                while not all(write.task_id in r.tasks for r in self.receivers):
                    arrival.clear()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        phase.fail(f"Task/{write.task_id}'s events did not all arrive in "
                                   f"{self.spec.stall:g} s")
                        return phase
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrival.wait(), left)
                phase.last_event = max(r.last_event_at for r in self.receivers)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            phase.fail(repr(exc))
        finally:
            api.close()
            for receiver in self.receivers:
                receiver.arrival = None
        return phase

    async def burst(self) -> Phase:
        phase, authorization = Phase("burst"), await asyncio.to_thread(self.token)
        issued = 0

        async def writer() -> None:
            nonlocal issued
            api = Connection(self.host, self.port, self.prefix, authorization)
            try:
                while issued < self.spec.events:
                    issued += 1
                    await self.create(api, phase)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                phase.fail(f"writer: {exc!r}")
            finally:
                api.close()

        phase.started = time.time()
        await asyncio.gather(*(writer() for _ in range(self.spec.concurrency)))
        return phase

    async def wait_for_events(self, phase: Phase) -> None:
        """Until every receiver has an event about each of the phase's Tasks, `timeout`
        passes, or no event arrived for `stall` seconds."""
        deadline = phase.started + self.spec.timeout
        wanted = {w.task_id for w in phase.writes}
        while True:
            complete = all(wanted <= r.tasks for r in self.receivers)
            now = time.time()
            phase.last_event = max([phase.started, *(r.last_event_at for r in self.receivers)])
            if complete or now > deadline or now - phase.last_event > self.spec.stall:
                return
            await asyncio.sleep(0.05)  # receipt times are stamped on arrival, not here

    async def run(self) -> dict[str, Any]:
        for receiver in self.receivers:
            await receiver.start()
        try:
            await self.subscribe()
            light = await self.light()
            burst = await self.burst()
            await self.wait_for_events(burst)
            waited = time.time() - burst.started
            await asyncio.sleep(SETTLE_SECONDS)  # duplicates, if any, would come now
            await self.unsubscribe()
        finally:
            for receiver in self.receivers:
                await receiver.stop()
        return self.summary(light, burst, waited)

    # -- what it came to ---------------------------------------------------------------------
    def summary(self, light: Phase, burst: Phase, waited: float) -> dict[str, Any]:
        phase_of = {w.task_id: (name, w) for name, p in (("light", light), ("burst", burst))
                    for w in p.writes}
        expected = len(phase_of)  # events per subscriber: numbers 1..expected
        latencies: dict[str, list[float]] = {"light": [], "burst": []}  # commit -> receipt
        after_response: dict[str, list[float]] = {"light": [], "burst": []}
        received = {"light": 0, "burst": 0}
        subscribers: list[dict[str, Any]] = []
        notifications = received_total = 0
        missing_total = duplicates_total = strangers_total = 0
        for receiver in self.receivers:
            seen: set[int] = set()
            duplicates = strangers = 0
            tasks: Counter[str] = Counter()
            for note in receiver.received:
                if note.kind != "event-notification":
                    continue
                notifications += 1
                for number, focus in note.events:
                    if number in seen:
                        duplicates += 1
                        continue
                    seen.add(number)
                    match = FOCUS.search(focus)
                    found = phase_of.get(match.group(1)) if match else None
                    if found is None or not 1 <= number <= expected:
                        strangers += 1
                        continue
                    name, write = found
                    tasks[write.task_id] += 1
                    received[name] += 1
                    latencies[name].append(note.at - write.committed)
                    after_response[name].append(note.at - write.answered)
            missing = sorted(set(range(1, expected + 1)) - seen)
            strangers += sum(count - 1 for count in tasks.values())  # a Task twice
            subscribers.append({"port": receiver.port, "events": len(seen),
                                "handshakes": receiver.handshakes(),
                                "missing": len(missing), "first_missing": missing[:5],
                                "duplicates": duplicates, "unexpected": strangers,
                                "unreadable": receiver.unreadable})
            received_total += len(seen)
            missing_total += len(missing)
            duplicates_total += duplicates
            strangers_total += strangers + len(receiver.unreadable)
        seconds = burst.last_event - burst.started if burst.writes else 0.0
        write_seconds = burst.finished - burst.started if burst.writes else 0.0
        light_seconds = light.last_event - light.started if light.writes else 0.0
        failures = light.failures + burst.failures + self.failures
        if missing_total:
            failures.append(f"{missing_total} of {expected * len(self.receivers)} events "
                            f"missing {waited:.1f} s after the burst began")
        if duplicates_total or strangers_total:
            failures.append(f"{duplicates_total} duplicated, {strangers_total} unexpected")

        def ms(values: list[float], q: float) -> float | None:
            return percentile_ms(sorted(values), q)

        def delivered(name: str, phase: Any, seconds: float) -> dict[str, Any]:
            """What one phase's events did: how many, how fast, how late."""
            late, after = latencies[name], after_response[name]
            return {"expected": len(phase.writes) * len(self.receivers),
                    "received": received[name], "seconds": round(seconds, 3),
                    "events_per_s": round(received[name] / seconds, 1) if seconds > 0
                    else 0.0,
                    "latency_p50_ms": ms(late, 0.50), "latency_p90_ms": ms(late, 0.90),
                    "latency_p99_ms": ms(late, 0.99), "latency_max_ms": ms(late, 1.0),
                    "after_response_p50_ms": ms(after, 0.50),
                    "after_response_p99_ms": ms(after, 0.99)}

        return {
            "subscribers": len(self.receivers), "concurrency": self.spec.concurrency,
            "max_count": self.spec.max_count, "filter": self.spec.filter,
            "active_after_s": round(self.active_after, 3),
            "writes": {"requests": len(burst.writes) + burst.errors, "ok": len(burst.writes),
                       "errors": burst.errors, "seconds": round(write_seconds, 3),
                       "rps": round(len(burst.writes) / write_seconds, 1)
                       if write_seconds > 0 else 0.0,
                       "p50_ms": ms(burst.latencies, 0.50),
                       "p99_ms": ms(burst.latencies, 0.99)},
            "delivery": delivered("burst", burst, seconds),
            "light": {"tasks": len(light.writes), "errors": light.errors,
                      **delivered("light", light, light_seconds)},
            "check": {"events_per_subscriber": expected, "missing": missing_total,
                      "duplicates": duplicates_total, "unexpected": strangers_total,
                      "complete": missing_total == 0, "notifications": notifications,
                      "events_per_notification": round(received_total / notifications, 1)
                      if notifications else None},
            "per_subscriber": subscribers,
            "errors": (light.errors + burst.errors + missing_total + duplicates_total
                       + strangers_total + len(self.failures)),
            "failures": failures[:10],
        }


def token_source(spec: Spec) -> Callable[[], str]:
    """A fresh access token's header value, fetched when called (blocking)."""
    if spec.credentials is None:
        return lambda: ""

    def fetch() -> str:
        import httpx

        from gateway.auth.credentials import Credentials, fetch_token

        url = spec.base_url.removesuffix("/fhir") + "/auth/token"
        with httpx.Client(timeout=30.0) as http:
            answer = fetch_token(http, url, Credentials.from_json(spec.credentials or {}))
        return f"Bearer {answer['access_token']}"

    return fetch


def main(argv: list[str]) -> None:
    with open(argv[0]) as file:
        spec = Spec(**json.load(file))
    print(json.dumps(run_pinned(spec.cpu, Bench(spec, token_source(spec)).run)))


if __name__ == "__main__":
    main(sys.argv[1:])
