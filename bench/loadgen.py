"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams (no dependencies).

N keep-alive connections each send a request, read the whole response, and send the
next, for a fixed duration or until a shared request count is reached. Run as its own
process (`python -m bench.loadgen SPEC.json`) so it does not share the server's core;
it prints one JSON object with the counts and latencies.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import workload

CONNECT_TIMEOUT = 10.0
RESPONSE_TIMEOUT = 60.0


@dataclass
class Spec:
    host: str
    port: int
    scenario: str
    connections: int
    duration: float = 0.0
    """Seconds of measurement after the warm-up (0: run `requests` requests instead)."""
    requests: int = 0
    warmup: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    cpu: int | None = None
    authorization: str | None = None
    """The Authorization header every request carries ("Bearer …"), if any."""


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.errors += 1
        if len(self.failures) < 5:
            self.failures.append(why)


def encode(host: str, port: int, method: str, path: str, body: bytes | None,
           authorization: str | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
            "Accept: application/fhir+json"]
    if authorization:
        head.append(f"Authorization: {authorization}")
    if body is not None:
        head += ["Content-Type: application/fhir+json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response: (status, body). Handles Content-Length and chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split(" ", 2)[1]), await read_body(reader, lines[1:])


async def read_body(reader: asyncio.StreamReader, header_lines: list[str]) -> bytes:
    """The body after these header lines: Content-Length or chunked (a request's or a
    response's)."""
    length, chunked = 0, False
    for line in header_lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return await reader.readexactly(length) if length else b""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        parts.append((await reader.readexactly(size + 2))[:-2])
        if size == 0:
            return b"".join(parts)


class Run:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.make: Callable[[int, int, random.Random], workload.Request] = (
            workload.builder(spec.scenario, spec.params))
        self.expected = workload.EXPECTED_STATUS[spec.scenario]
        self.tally = Tally()
        self.issued = 0
        self.start = self.measure_from = self.stop_at = 0.0

    def next_index(self) -> int | None:
        """Count mode: the next request number, or None when all are taken."""
        if self.spec.duration:
            return 0 if time.perf_counter() < self.stop_at else None
        if self.issued >= self.spec.requests:
            return None
        self.issued += 1
        return self.issued - 1

    async def connection(self, number: int) -> None:
        spec, rng = self.spec, random.Random(number)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(spec.host, spec.port), CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            self.tally.fail(f"connect: {exc!r}")
            return
        sent = 0
        try:
            while (index := self.next_index()) is not None:
                # Count mode numbers requests across connections; duration mode per connection.
                method, path, body = self.make(number, sent if spec.duration else index, rng)
                sent += 1
                begun = time.perf_counter()
                writer.write(encode(spec.host, spec.port, method, path, body,
                                    spec.authorization))
                status, payload = await asyncio.wait_for(read_response(reader),
                                                         RESPONSE_TIMEOUT)
                done = time.perf_counter()
                if begun < self.measure_from:
                    continue
                self.tally.statuses[status] = self.tally.statuses.get(status, 0) + 1
                if status == self.expected:
                    self.tally.latencies.append(done - begun)
                else:
                    self.tally.fail(f"{method} {path[:80]} -> {status} {payload[:200]!r}")
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.tally.fail(f"connection {number}: {exc!r}")
        finally:
            writer.close()

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        self.start = time.perf_counter()
        self.measure_from = self.start + (spec.warmup if spec.duration else 0.0)
        self.stop_at = self.measure_from + spec.duration
        await asyncio.gather(*(self.connection(n) for n in range(spec.connections)))
        elapsed = time.perf_counter() - self.measure_from
        return summary(self.tally, elapsed)


def percentile_ms(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile in milliseconds; None when nothing was measured."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values), max(1, math.ceil(fraction * len(sorted_values))))
    return round(sorted_values[rank - 1] * 1000, 2)


def summary(tally: Tally, elapsed: float) -> dict[str, Any]:
    latencies = sorted(tally.latencies)
    return {
        "requests": len(latencies) + tally.errors,
        "ok": len(latencies),
        "errors": tally.errors,
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p90_ms": percentile_ms(latencies, 0.90),
        "p99_ms": percentile_ms(latencies, 0.99),
        "max_ms": percentile_ms(latencies, 1.0),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "failures": tally.failures,
    }


def run_pinned(cpu: int | None, work: Callable[[], Any]) -> Any:
    """Run a load generator's coroutine on uvloop (when installed), pinned to `cpu`: the
    load must not take the server's core."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(work())


def main(argv: list[str]) -> None:
    with open(argv[0]) as file:
        spec = Spec(**json.load(file))
    print(json.dumps(run_pinned(spec.cpu, Run(spec).run)))


if __name__ == "__main__":
    main(sys.argv[1:])
