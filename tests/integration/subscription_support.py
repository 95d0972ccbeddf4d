"""What the Subscription tests share: real HTTP receivers on 127.0.0.1 that record every
notification (and can be taken down, slowed or made to fail), Subscription bodies, and
reading a notification Bundle."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gateway.settings import Settings

TOPICS = "https://atm-gateway.org/fhir/SubscriptionTopic/"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FHIR = {"content-type": "application/fhir+json"}
WAIT_SECONDS = 15.0


def subscription_settings(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Overrides for a server that matches and delivers, quickly, to 127.0.0.1."""
    return {"subscriptions": True, "load_topics": True, "subscription_poll_seconds": 0.05,
            "subscription_allowed_hosts": ["127.0.0.1"], "subscription_retry_seconds": 0.1,
            "subscription_retry_max_seconds": 0.4, **overrides}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    bundle: dict[str, Any]
    at: float

    @property
    def status(self) -> dict[str, Any]:
        return self.bundle["entry"][0]["resource"]

    def param(self, name: str) -> Any:
        for p in self.status["parameter"]:
            if p["name"] == name:
                return next(v for k, v in p.items() if k.startswith("value"))
        return None

    @property
    def kind(self) -> str:
        return str(self.param("type"))

    @property
    def events(self) -> list[dict[str, Any]]:
        """Each notification-event as {event-number, timestamp, focus, additional-context}."""
        out = []
        for p in self.status["parameter"]:
            if p["name"] != "notification-event":
                continue
            event: dict[str, Any] = {"additional-context": []}
            for part in p["part"]:
                value = next(v for k, v in part.items() if k.startswith("value"))
                if part["name"] == "additional-context":
                    event["additional-context"].append(value["reference"])
                else:
                    event[part["name"]] = value["reference"] if isinstance(value, dict) \
                        else value
            out.append(event)
        return out


@dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1: answers `answer` (after `delay` seconds), records
    what it received; `down()` closes its port, `up()` opens the same port again."""

    answer: int = 200
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    arrived: int = 0  # requests that reached the handler, answered or not yet
    port: int = 0
    _server: http.server.ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def up(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                length = int(self.headers.get("Content-Length") or 0)
                data = json.loads(self.rfile.read(length))
                with receiver._lock:
                    receiver.arrived += 1
                if receiver.delay:
                    time.sleep(receiver.delay)
                answer = receiver.answer
                if answer < 300:
                    with receiver._lock:
                        receiver.received.append(Received(
                            self.path, {k.lower(): v for k, v in self.headers.items()},
                            data, time.time()))
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        # Checking for shutdown every 50 ms, not the default 0.5 s: down() waits for it, at
        # the end of every test.
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of_kind(self, kind: str, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.kind == kind
                    and (path is None or r.path == path)]

    def event_numbers(self, path: str | None = None) -> list[int]:
        return [int(e["event-number"]) for r in self.of_kind("event-notification", path)
                for e in r.events]

    def wait_for(self, predicate: Callable[[Receiver], bool],
                 seconds: float = WAIT_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while not predicate(self):
            if time.monotonic() > deadline:
                kinds = [(r.path, r.kind, [e["event-number"] for e in r.events])
                         for r in self.received]
                raise AssertionError(f"timed out; received so far: {kinds}\n"
                                     f"{_threads_now()}")
            time.sleep(0.02)


def _threads_now() -> str:
    """Where every thread of this process is: what a timed-out wait was waiting behind."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- thread {names.get(ident, ident)}\n"
                     + "".join(traceback.format_stack(frame)[-8:])
                     for ident, frame in sys._current_frames().items())


@contextmanager
def receiving(**options: Any) -> Iterator[Receiver]:
    receiver = Receiver(**options)
    receiver.up()
    try:
        yield receiver
    finally:
        receiver.down()


def subscription(endpoint: str, topic: str = "task-status", *, content: str = "id-only",
                 filters: tuple[str, ...] = (), heartbeat: int | None = None,
                 timeout: int | None = None, max_count: int | None = None,
                 headers: tuple[str, ...] = (), channel: str = "rest-hook") -> dict[str, Any]:
    channel_body: dict[str, Any] = {
        "type": channel, "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": BACKPORT + "backport-payload-content",
                                    "valueCode": content}]}}
    if channel == "rest-hook":
        channel_body["endpoint"] = endpoint
    if headers:
        channel_body["header"] = list(headers)
    extensions = [(BACKPORT + "backport-heartbeat-period", "valueUnsignedInt", heartbeat),
                  (BACKPORT + "backport-timeout", "valueUnsignedInt", timeout),
                  (BACKPORT + "backport-max-count", "valuePositiveInt", max_count)]
    channel_body["extension"] = [{"url": url, kind: value}
                                 for url, kind, value in extensions if value is not None]
    body: dict[str, Any] = {"resourceType": "Subscription", "status": "requested",
                            "reason": "test", "criteria": TOPICS + topic,
                            "channel": channel_body}
    if filters:
        body["_criteria"] = {"extension": [
            {"url": BACKPORT + "backport-filter-criteria", "valueString": f}
            for f in filters]}
    return body


def task(owner: str = "Organization/lims", status: str = "requested",
         **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": status, "intent": "order",
            "owner": {"reference": owner}, **extra}
