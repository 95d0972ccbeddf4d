"""Request id, Prometheus metrics and JSON access log for every HTTP request.

A plain ASGI middleware (no BaseHTTPMiddleware: that one costs a task and a memory
stream per request). It wraps the whole stack, error handler included, so a 500 also
carries its X-Request-ID and is counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import Settings

access_log = logging.getLogger("gateway.access")

REQUESTS = Counter("atm_http_requests", "HTTP requests answered",
                   ["method", "route", "status"])
LATENCY = Histogram("atm_http_request_duration_seconds",
                    "Time from the request's arrival to the end of its response",
                    ["method", "route", "status"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                             2.5, 5.0, 10.0))
# Label values must stay few: a client choosing the method or the path must not be able
# to create new time series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
_MAX_ID = 64
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _instruments(method: str, route: str, status: int) -> tuple[Any, Any]:
    """The labelled counter and histogram, cached: `labels()` takes a lock each call."""
    key = (method, route, status)
    found = _children.get(key)
    if found is None:
        labels = (method, route, str(status))
        found = _children[key] = (REQUESTS.labels(*labels), LATENCY.labels(*labels))
    return found


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-ID when it is a short token, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if 0 < len(given) <= _MAX_ID and _ID_CHARS.issuperset(given):
                return given
            break
    # 128 random bits, as unique as uuid4().hex; ids correlate log lines and need no
    # cryptographic randomness (os.urandom's system call cost more than the rest).
    return f"{random.getrandbits(128):032x}"


def route_of(scope: Scope) -> str:
    """The matched route's template ("/fhir/{type}/{id}"), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestLog:
    """What each answered request leaves: its Prometheus samples (a count and a duration
    by method, route and status) and its JSON access-log line, both kept here and put
    out together at most FLUSH_SECONDS later, when BATCH_LINES have gathered, when
    /metrics is read (`flush`), or at shutdown.

    Done per request, both sat in the middle of every request with cold caches: a line
    through `logging` cost ~35 µs (a LogRecord, the formatter, a write and a flush per
    line), and the labelled instruments ~6 µs of a ~100 µs read (a lock per call, the
    histogram's buckets walked in Python). Now a request costs a list append; lines are
    the same JSON objects the logging formatter makes, built directly.

    With several workers (PROMETHEUS_MULTIPROC_DIR) samples go to the shared files at
    once: a scrape answered by one worker reads the others' files, and cannot empty the
    others' lists.
    """

    FLUSH_SECONDS = 0.25
    BATCH_LINES = 256

    def __init__(self) -> None:
        self._samples_at_once = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._pending: list[tuple[str, str, int, float, str, float, bool]] = []
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # where a flush is due

    def add(self, method: str, route: str, status: int, seconds: float, request_id: str,
            line: bool = True) -> None:
        """One answered request; `line`: whether it gets an access-log line."""
        if self._samples_at_once:
            _observe(method, route, status, seconds)
            if not line:
                return
        self._pending.append((method, route, status, seconds, request_id, time.time(), line))
        if len(self._pending) >= self.BATCH_LINES:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): at once
            self.flush()
            return
        if self._timer_loop is not loop:  # none due here (or its loop has gone)
            self._timer_loop = loop
            loop.call_later(self.FLUSH_SECONDS, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer_loop = None
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self._samples_at_once:
            for method, route, status, seconds, *_ in pending:
                _observe(method, route, status, seconds)
        lines = [orjson.dumps({
            "ts": timestamp(at), "level": "INFO", "logger": access_log.name,
            "message": f"{method} {route} {status}", "method": method, "route": route,
            "status": status, "duration_ms": round(seconds * 1000, 3),
            "request_id": request_id})
            for method, route, status, seconds, request_id, at, line in pending if line]
        if lines:
            self._write(lines)

    @staticmethod
    def _write(lines: list[bytes]) -> None:
        try:
            sys.stderr.write(b"\n".join([*lines, b""]).decode())
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr closed at interpreter exit
            pass


def _observe(method: str, route: str, status: int, seconds: float) -> None:
    counter, histogram = _instruments(method, route, status)
    counter.inc()
    histogram.observe(seconds)


REQUEST_LOG = RequestLog()


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, log_access: bool) -> None:
        self.app = app
        # As before with `logging`: the `gateway.access` logger's level still decides.
        self.log_access = log_access and access_log.isEnabledFor(logging.INFO)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = request_id_of(scope)
        # Handlers read request.state.request_id; Request.state is backed by scope["state"].
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("ascii"))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_LOG.add(scope["method"] if scope["method"] in _METHODS else "other",
                            route_of(scope), status, time.perf_counter() - start, request_id,
                            self.log_access)


def install(app: FastAPI, settings: Settings,
            wrap: Callable[[ASGIApp], ASGIApp] = lambda inner: inner) -> None:
    """Wrap the app's whole middleware stack (and what `wrap` puts around it), outside
    Starlette's server-error handler."""
    build = app.build_middleware_stack

    def build_with_observability() -> ASGIApp:
        return ObservabilityMiddleware(wrap(build()), log_access=settings.log_json)

    app.build_middleware_stack = build_with_observability  # type: ignore[method-assign]


def timestamp(seconds: float) -> str:
    """UTC with milliseconds: 2026-11-23T00:45:12.345Z."""
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int(seconds % 1 * 1000):03d}Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extras."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
        "message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in self._STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def log_config(settings: Settings) -> dict[str, Any]:
    """A logging.config.dictConfig for `atm serve` (uvicorn applies it in every worker)."""
    formatter = ({"()": f"{__name__}.JsonFormatter"} if settings.log_json
                 else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"})
    handler = {"class": "logging.StreamHandler", "formatter": "main",
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "root": {"handlers": ["main"], "level": "WARNING"},
        "loggers": {
            "gateway": {"level": settings.log_level.upper()},
            "uvicorn": {"level": "WARNING"},
        },
    }
