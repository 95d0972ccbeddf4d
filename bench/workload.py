"""What the benchmark sends: the loaded Tasks and each scenario's requests.

Loaded Tasks have known ids (`bench-<n>`), so reads and updates need no id list; their
statuses and owners are spread so that `status=ready&owner=Organization/org-N` matches
about 1/600 of them (about 170 at 100k).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson

STATUSES = ["ready", "in-progress", "completed", "requested", "accepted", "on-hold"]
ORGANISATIONS = 100
BUNDLE_SIZE = 100
CODE = {"coding": [{"system": "http://example.org/atm-step", "code": "apheresis",
                    "display": "Apheresis"}]}

Request = tuple[str, str, bytes | None]
Builder = Callable[[int, int, random.Random], Request]
"""(connection number, sequence number, connection's random) -> (method, path, body)."""

EXPECTED_STATUS = {"asgi-get": 200, "asgi-post": 201, "fastapi-get": 200, "fastapi-post": 201,
                   "load": 200, "create": 201,
                   "read": 200, "update": 200, "search": 200, "search-1": 200,
                   "transaction": 200, "find-chain": 200}


def task_id(n: int) -> str:
    return f"bench-{n}"


def loaded_task(n: int, description: str = "loaded by the benchmark") -> dict[str, Any]:
    """Task number n: status cycles fastest, so every status meets every owner."""
    return {"resourceType": "Task", "id": task_id(n), "status": STATUSES[n % len(STATUSES)],
            "intent": "order", "code": CODE, "description": description,
            "owner": {"reference": f"Organization/org-{(n // len(STATUSES)) % ORGANISATIONS}"},
            "for": {"reference": f"Patient/p-{n % 5000}"},
            "authoredOn": "2025-01-15T09:30:00Z"}


def new_task() -> dict[str, Any]:
    """A Task for create and transaction scenarios; its owner matches no searched one."""
    return {"resourceType": "Task", "status": "ready", "intent": "order", "code": CODE,
            "owner": {"reference": "Organization/bench-new"},
            "authoredOn": "2025-01-15T09:30:00Z"}


def load_bundle(first: int, count: int) -> bytes:
    """A transaction that PUTs Tasks first..first+count-1 (update-as-create)."""
    entries = [{"resource": loaded_task(n), "request": {"method": "PUT",
                                                        "url": f"Task/{task_id(n)}"}}
               for n in range(first, first + count)]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def create_bundle(size: int) -> bytes:
    entries = [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
                "resource": new_task(), "request": {"method": "POST", "url": "Task"}}
               for n in range(size)]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def builder(scenario: str, params: dict[str, Any]) -> Builder:
    """The request maker of a scenario. params: tasks (loaded), connections."""
    tasks = int(params.get("tasks", 0))
    connections = int(params.get("connections", 1))
    if scenario in ("asgi-get", "fastapi-get"):
        return lambda c, i, rng: ("GET", "/bare", None)
    if scenario in ("asgi-post", "fastapi-post", "create"):
        body = orjson.dumps(new_task())
        path = "/fhir/Task" if scenario == "create" else "/bare"
        return lambda c, i, rng: ("POST", path, body)
    if scenario == "load":
        return lambda c, i, rng: ("POST", "/fhir", load_bundle(
            i * BUNDLE_SIZE, min(BUNDLE_SIZE, tasks - i * BUNDLE_SIZE)))
    if scenario == "read":
        return lambda c, i, rng: ("GET", f"/fhir/Task/{task_id(rng.randrange(tasks))}", None)
    if scenario == "update":
        return _update(tasks, connections)
    if scenario in ("search", "search-1"):
        return lambda c, i, rng: (
            "GET", f"/fhir/Task?status=ready&owner=Organization/org-"
                   f"{rng.randrange(ORGANISATIONS)}&_count=20", None)
    if scenario == "transaction":
        bundle = create_bundle(BUNDLE_SIZE)
        return lambda c, i, rng: ("POST", "/fhir", bundle)
    if scenario == "find-chain":
        return _find_chain(params)
    raise ValueError(f"unknown scenario {scenario}")


def _update(tasks: int, connections: int) -> Builder:
    """Connection c updates Tasks c, c+C, c+2C…: no two connections touch the same Task
    (until the ids wrap), so updates measure writing, not version contention."""

    def make(c: int, i: int, rng: random.Random) -> Request:
        n = (c + i * connections) % tasks
        body = orjson.dumps(loaded_task(n, description=f"updated {i}"))
        return "PUT", f"/fhir/Task/{task_id(n)}", body

    return make


def _find_chain(params: dict[str, Any]) -> Builder:
    """$find-chain for one of the enrolled patients (bench.findchain), the first step from
    a random half hour of the loaded days (the search window is the server's default, 90
    days from there); one request in four is urgent (manufacturing's lead is shorter)."""
    careplans: list[str] = params["careplans"]
    first = datetime.fromisoformat(params["first_day"].replace("Z", "+00:00"))
    half_hours = int(params["days"]) * 48

    def make(c: int, i: int, rng: random.Random) -> Request:
        start = first + timedelta(minutes=30 * rng.randrange(half_hours))
        urgent = "&priority=urgent" if i % 4 == 3 else ""
        return ("GET", f"/fhir/CarePlan/{rng.choice(careplans)}/$find-chain?start="
                       f"{start:%Y-%m-%dT%H:%M:%SZ}{urgent}", None)

    return make
