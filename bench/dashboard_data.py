"""The dashboard benchmark's data set (bench.dashboard): running and finished journeys
across the three shipped protocols, 10 treatment centres and their partners, each played
by the orchestration engine itself, in memory (`decide` and the resources of
orchestration/writes.py, a partner completing each open step after a random share of its
deadline), so Tasks, sub-stages, skipped stages, proposed Appointments, ServiceRequests
and overdue Flags have the orchestrator's exact shape; then every timestamp is shifted
so that the journey's present is now (running journeys stop at a random stage; finished
ones ended up to 120 days ago). Written through the repository, 50 journeys to a
transaction.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gateway.services.context import Context, FhirRequest
from gateway.services.protocols import SHIPPED
from gateway.services.router import handle
from gateway.store.database import Database
from gateway.store.repository import Actor, Repository, new_id
from gateway.store.schema import metadata
from mappings.protocols import compile_protocol
from orchestration import writes
from orchestration.effects import (
    CompletePlan,
    Effect,
    HoldPlan,
    MarkOverdue,
    SetTaskStatus,
    SkipStage,
    StartStage,
)
from orchestration.engine import decide
from orchestration.protocol import Protocol, from_plan_definition
from orchestration.state import ROLE_ASSIGNMENT, plan_state, task_run_key

CENTRES = 10
PARTNERS = {"apheresis-centre": 4, "manufacturer": 3, "courier": 2, "payer": 2}
JOURNEYS_PER_TRANSACTION = 50
EPOCH = datetime(2020, 1, 6, tzinfo=UTC)  # journeys are played from here, then shifted
_INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


# -- one journey, played by the engine ---------------------------------------------------
@dataclass
class Journey:
    protocol: Protocol
    careplan: dict[str, Any]
    patient: dict[str, Any]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    others: list[dict[str, Any]] = field(default_factory=list)  # focus resources, Flags

    def resources(self) -> Iterator[dict[str, Any]]:
        yield self.patient
        yield self.careplan
        yield from self.others
        yield from self.tasks.values()


def apply(journey: Journey, effects: list[Effect], now: datetime) -> None:
    """What the orchestrator's applier writes for each effect (orchestration/applier.py),
    Communications and Provenances left out: the board does not read them."""
    state = plan_state(journey.careplan, journey.tasks.values(), journey.patient)
    plan = journey.careplan
    for effect in effects:
        if isinstance(effect, StartStage):
            *focus, task = writes.stage_resources(journey.protocol, state, effect, now)
            journey.others += focus
            journey.tasks[task["id"]] = task
            plan.setdefault("activity", []).append({"reference": {
                "reference": f"Task/{task['id']}", "display": task.get("description")}})
        elif isinstance(effect, SkipStage):
            plan.setdefault("activity", []).append(
                writes.skipped_activity(state, journey.protocol, effect))
        elif isinstance(effect, SetTaskStatus):
            task = journey.tasks[effect.task["id"]]
            task["status"] = effect.status
            task["executionPeriod"] = {**task.get("executionPeriod", {}),
                                       "end": writes.instant(effect.at or now)}
        elif isinstance(effect, MarkOverdue):
            task, flag, _ = writes.overdue_resources(state, effect, now)
            journey.tasks[task["id"]] = task
            journey.others.append(flag)
        elif isinstance(effect, HoldPlan | CompletePlan):
            plan["status"] = "on-hold" if isinstance(effect, HoldPlan) else "completed"
            if isinstance(effect, CompletePlan):
                plan["period"] = {**plan.get("period", {}), "end": writes.instant(now)}


def play(journey: Journey, steps: int | None, rng: random.Random) -> datetime:
    """Advance from EPOCH, a partner completing the earliest open step each time, for
    `steps` steps (None: to the end); the simulated time reached."""
    clock = EPOCH
    done = 0
    while steps is None or done < steps:
        apply(journey, decide(journey.protocol, _state(journey), clock), clock)
        task = _next_open_step(journey)
        if task is None:
            break
        stage = journey.protocol.stages[_stage(task)]
        window = task["restriction"]["period"]
        begin = max(clock, _parse(window["start"]))
        took = (stage.deadline or timedelta(hours=4)) * rng.uniform(0.2, 0.9)
        task["status"] = "completed"
        task["executionPeriod"] = {"start": writes.instant(begin),
                                   "end": writes.instant(begin + took)}
        clock = begin + took
        done += 1
    apply(journey, decide(journey.protocol, _state(journey), clock), clock)
    return clock


def _state(journey: Journey) -> Any:
    return plan_state(journey.careplan, journey.tasks.values(), journey.patient)


def _stage(task: dict[str, Any]) -> str:
    key = task_run_key(task)
    assert key is not None
    return key[1]


def _next_open_step(journey: Journey) -> dict[str, Any] | None:
    """The open step a partner does next: the one whose window opens first (a stage with
    sub-stages is completed by the orchestrator when they are)."""
    open_steps = [t for t in journey.tasks.values() if t["status"] == "ready"
                  and not journey.protocol.stages[_stage(t)].children]
    return min(open_steps, key=lambda t: t["restriction"]["period"]["start"], default=None)


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def shifted(value: Any, delta: timedelta) -> Any:
    """Every instant in a resource moved by `delta` (the journey brought to the present)."""
    if isinstance(value, dict):
        return {k: shifted(v, delta) for k, v in value.items()}
    if isinstance(value, list):
        return [shifted(v, delta) for v in value]
    if isinstance(value, str) and _INSTANT.match(value):
        return writes.instant(_parse(value) + delta)
    return value


# -- the data set -------------------------------------------------------------------------
@dataclass
class Network:
    """The protocols and the organisations journeys are spread over."""

    protocols: list[tuple[dict[str, Any], Protocol]]
    centres: list[str]
    partners: dict[str, list[str]]

    def organizations(self) -> list[dict[str, Any]]:
        refs = [*self.centres, *(r for refs in self.partners.values() for r in refs)]
        return [{"resourceType": "Organization", "id": r.split("/")[1],
                 "name": r.split("/")[1].replace("-", " ").title()} for r in refs]


def network() -> Network:
    protocols = []
    for path in sorted(SHIPPED.glob("*.yaml")):
        compiled = compile_protocol(path.read_text(encoding="utf-8"), str(path))
        protocols.append((compiled.bundle(), from_plan_definition(
            compiled.plan_definition, compiled.activity_definitions)))
    return Network(protocols, [f"Organization/centre-{n}" for n in range(CENTRES)],
                   {role: [f"Organization/{role}-{n}" for n in range(count)]
                    for role, count in PARTNERS.items()})


def journey(net: Network, number: int, rng: random.Random, now: datetime,
            finished: bool) -> Journey:
    _, protocol = net.protocols[number % len(net.protocols)]
    centre = net.centres[number % len(net.centres)]
    patient_id, careplan_id = new_id(), new_id()
    patient = {"resourceType": "Patient", "id": patient_id,
               "name": [{"family": f"Patient{number}", "given": ["Bench"]}],
               "managingOrganization": {"reference": centre}}
    assigned = [{"url": ROLE_ASSIGNMENT, "extension": [
        {"url": "role", "valueCode": role},
        {"url": "organization", "valueReference": {"reference": refs[number % len(refs)]}}]}
        for role, refs in net.partners.items()]
    careplan = {"resourceType": "CarePlan", "id": careplan_id, "status": "active",
                "intent": "plan", "instantiatesCanonical": [protocol.canonical],
                "title": protocol.title, "subject": {"reference": f"Patient/{patient_id}"},
                "author": {"reference": centre}, "period": {"start": writes.instant(EPOCH)},
                "extension": assigned}
    played = Journey(protocol, careplan, patient)
    # A running journey stops short of its last steps (a finished one plays them all).
    leaves = [s for s in protocol.stages.values() if not s.children and not s.condition]
    steps = None if finished else rng.randrange(max(1, len(leaves) - 2))
    reached = play(played, steps, rng)
    # The present of a running journey lies up to two days after its last step; a
    # finished one ended up to 120 days ago. Deadlines passed since are marked overdue.
    delta = now - (timedelta(days=rng.uniform(0, 120)) if finished
                   else timedelta(days=rng.uniform(0, 2))) - reached
    moved = Journey(protocol, shifted(careplan, delta), patient,
                    {k: shifted(t, delta) for k, t in played.tasks.items()},
                    shifted(played.others, delta))
    if not finished:
        apply(moved, decide(protocol, _state(moved), now), now)
    return moved


def load(ctx: Context, net: Network, now: datetime, *, running: int, finished: int,
         seed: int) -> dict[str, int]:
    """Protocols and organisations, then the journeys; what was written, by type."""
    rng = random.Random(seed)
    for bundle, _ in net.protocols:
        handle(ctx, FhirRequest("POST", "", body=orjson.dumps(bundle),
                                content_type="application/fhir+json"))
    written: dict[str, int] = {}
    with ctx.db.write() as conn:
        repo = Repository(conn, Actor("bench"))
        for organization in net.organizations():
            repo.create(organization, organization["id"])
    total = running + finished
    for first in range(0, total, JOURNEYS_PER_TRANSACTION):
        batch = [journey(net, n, rng, now, finished=n >= running)
                 for n in range(first, min(total, first + JOURNEYS_PER_TRANSACTION))]
        with ctx.db.write() as conn:
            repo = Repository(conn, Actor("bench"))
            for played in batch:
                for resource in played.resources():
                    repo.create(resource, resource["id"])
                    kind = resource["resourceType"]
                    written[kind] = written.get(kind, 0) + 1
    return written


def analyze(db: Database) -> None:
    """PostgreSQL's statistics after the bulk load, as autovacuum would keep them."""
    if db.is_sqlite:
        return
    with db.write() as conn:
        conn.exec_driver_sql("ANALYZE " + ", ".join(f'"{t.name}"' for t in
                                                    metadata.sorted_tables))

