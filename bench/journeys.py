"""Orchestration under load: enrolments driven to completion through a running gateway.

`python -m bench.journeys SPEC.json` loads a small protocol (seven stages: a parallel
pair, then a chain), enrols `enrolments` patients in 100-CarePlan transactions, then
`concurrency` partners complete each enrolment's Tasks as the orchestrator inside the
server writes them, until every CarePlan is completed. It prints one JSON object:

- advances per second: Tasks the orchestrator wrote during the drive, over its length;
- latency from a Task's completion to its successor's existence, read from the server's
  own clock (the successor's `meta.lastUpdated` minus that of the completing version), so
  the client's polling does not blur it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from gateway.auth.credentials import Credentials, SmartAuth
from mappings.protocols import compile_protocol
from orchestration.state import parse_instant, resource_id

PROTOCOL = """
protocol: bench-journey
version: "1"
title: Benchmark journey
roles:
  centre: Treatment centre
stages:
  - {id: intake, role: centre}
  - {id: eligibility, after: [intake], role: centre}
  - {id: consent, after: [intake], role: centre}
  - {id: apheresis, after: [eligibility, consent], role: centre}
  - {id: manufacturing, after: [apheresis], role: centre}
  - {id: infusion, after: [manufacturing], role: centre}
  - {id: follow-up, after: [infusion], role: centre}
"""
TAG_SYSTEM = "https://atm-gateway.org/bench/journeys"
FHIR = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
POLL_SECONDS = 0.02  # partners look again; latencies come from the server clock


@dataclass
class Spec:
    base_url: str
    enrolments: int = 1000
    concurrency: int = 32
    timeout: float = 600.0
    cpu: int | None = None
    credentials: dict[str, Any] | None = None
    """A client's credentials (Credentials.to_json) when the server asks for tokens."""


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, server clock
    advances: int = 0
    errors: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, to read


def _stamp(resource: dict[str, Any]) -> datetime:
    stamped = parse_instant(resource["meta"]["lastUpdated"])
    assert stamped is not None
    return stamped


class Driver:
    def __init__(self, client: httpx.AsyncClient, spec: Spec) -> None:
        self.client, self.spec = client, spec
        self.compiled = compile_protocol(PROTOCOL, "bench-journey")
        self.stages = {s.id: [a.stage.name for a in s.after]
                       for s in self.compiled.protocol.stages}
        self.tally = Tally()
        self.run_tag = uuid.uuid4().hex  # marks this run's CarePlans, to count them

    async def load_protocol(self) -> str:
        response = await self.client.post("", json=self.compiled.bundle(), headers=FHIR)
        response.raise_for_status()
        return str(self.compiled.plan_definition["url"])

    async def enrol(self, url: str) -> list[str]:
        """CarePlans in 100-entry transactions; their ids."""
        ids: list[str] = []
        for first in range(0, self.spec.enrolments, 100):
            count = min(100, self.spec.enrolments - first)
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": {"resourceType": "CarePlan", "status": "active",
                              "meta": {"tag": [{"system": TAG_SYSTEM, "code": self.run_tag}]},
                              "intent": "plan", "instantiatesCanonical": [url],
                              "subject": {"reference": f"Patient/bench-{first + n}"}},
                 "request": {"method": "POST", "url": "CarePlan"}} for n in range(count)]}
            response = await self.client.post("", json=bundle, headers=FHIR)
            response.raise_for_status()
            # location: [base/]CarePlan/<id>/_history/1
            ids += [e["response"]["location"].split("CarePlan/", 1)[1].split("/")[0]
                    for e in response.json()["entry"]]
        return ids

    async def _task(self, careplan_id: str, stage: str) -> dict[str, Any]:
        path = f"Task/{resource_id('Task', careplan_id, stage, 1)}"
        deadline = time.monotonic() + self.spec.timeout
        while True:
            response = await self.client.get(path, headers=FHIR)
            if response.status_code == 200:
                task: dict[str, Any] = response.json()
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never appeared")
            await asyncio.sleep(POLL_SECONDS)

    async def _complete(self, task: dict[str, Any]) -> dict[str, Any]:
        body = task | {"status": "completed"}
        response = await self.client.put(f"Task/{task['id']}", json=body, headers=FHIR)
        response.raise_for_status()
        done: dict[str, Any] = response.json()
        return done

    async def journey(self, careplan_id: str) -> None:
        completed: dict[str, dict[str, Any]] = {}
        while len(completed) < len(self.stages):
            due = [s for s, after in self.stages.items()
                   if s not in completed and all(a in completed for a in after)]
            tasks = await asyncio.gather(*(self._task(careplan_id, s) for s in due))
            for stage, task in zip(due, tasks, strict=True):
                self.tally.advances += 1
                if self.stages[stage]:  # the first Task answers the enrolment, not a Task
                    done_at = max(_stamp(completed[a]) for a in self.stages[stage])
                    self.tally.latencies.append((_stamp(task) - done_at).total_seconds())
            for stage, done in zip(due, await asyncio.gather(*map(self._complete, tasks)),
                                   strict=True):
                completed[stage] = done

    async def completed_careplans(self) -> int:
        """CarePlans the orchestrator has completed (it does so just after the last Task
        of each: waited for, briefly)."""
        deadline = time.monotonic() + 30
        while True:
            response = await self.client.get(
                f"CarePlan?status=completed&_tag={TAG_SYSTEM}|{self.run_tag}&_summary=count",
                headers=FHIR)
            total = int(response.json().get("total", 0))
            if total >= self.spec.enrolments or time.monotonic() > deadline:
                return total
            await asyncio.sleep(0.1)

    async def drive(self, careplans: list[str]) -> None:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for careplan_id in careplans:
            queue.put_nowait(careplan_id)

        async def partner() -> None:
            while not queue.empty():
                careplan_id = queue.get_nowait()
                try:
                    await self.journey(careplan_id)
                except (httpx.HTTPError, TimeoutError) as exc:
                    self.tally.errors += 1
                    if len(self.tally.failures) < 5:
                        self.tally.failures.append(
                            f"CarePlan/{careplan_id}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(partner() for _ in range(self.spec.concurrency)))


def _percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def run(spec: Spec) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=spec.concurrency * 2)
    auth = None
    if spec.credentials is not None:
        auth = SmartAuth(spec.base_url.removesuffix("/fhir") + "/auth/token",
                         Credentials.from_json(spec.credentials))
    async with httpx.AsyncClient(base_url=spec.base_url.rstrip("/") + "/", limits=limits,
                                 timeout=60.0, auth=auth) as client:
        driver = Driver(client, spec)
        url = await driver.load_protocol()
        careplans = await driver.enrol(url)
        started = time.monotonic()
        await driver.drive(careplans)
        seconds = time.monotonic() - started
        completed = await driver.completed_careplans()
    tally = driver.tally
    return {"enrolments": spec.enrolments, "concurrency": spec.concurrency,
            "completed_careplans": completed,
            "advances": tally.advances, "seconds": round(seconds, 2),
            "advances_per_s": round(tally.advances / seconds, 1) if seconds else None,
            "latency_p50_ms": _percentile_ms(tally.latencies, 0.50),
            "latency_p99_ms": _percentile_ms(tally.latencies, 0.99),
            "latency_max_ms": _percentile_ms(tally.latencies, 1.0),
            "errors": tally.errors, "failures": tally.failures}


def main(argv: list[str]) -> None:
    with open(argv[0]) as file:
        spec = Spec(**json.load(file))
    if spec.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec.cpu})
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main(sys.argv[1:])
