"""Where one enrolment stands: each stage's latest run, read from the CarePlan and the
Tasks the orchestrator wrote for it. Pure: FHIR dicts in, frozen values out."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestration.protocol import ATM, EXT

KEY_SYSTEM = f"{ATM}/orchestration-key"
KEY_EXTENSION = EXT + "orchestration-key"
ROLE_ASSIGNMENT = EXT + "role-assignment"
_ID_NAMESPACE = uuid.UUID("6f1c2a4e-31f5-4c1e-9d7a-0b8f2a6e5c11")

# A run's outcome, by its Task's status.
ACTIVE = frozenset({"draft", "requested", "received", "accepted", "ready", "in-progress",
                    "on-hold"})
FAILED = frozenset({"failed", "rejected", "cancelled", "entered-in-error"})


def run_key(careplan_id: str, stage: str, run: int) -> str:
    return f"{careplan_id}/{stage}/{run}"


def resource_id(kind: str, careplan_id: str, stage: str, run: int) -> str:
    """The id of what a stage's run writes (a Task, its ServiceRequest...): derived from
    the run, so a replayed or raced step finds it already there instead of writing twice."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{run_key(careplan_id, stage, run)}"))


def parse_instant(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Run:
    """One run of a stage: `outcome` is active, done, skipped or failed."""

    stage: str
    number: int
    outcome: str
    task: dict[str, Any] | None = None  # None when skipped
    finished_at: datetime | None = None

    @property
    def reference(self) -> str | None:
        return f"Task/{self.task['id']}" if self.task else None

    @property
    def period(self) -> dict[str, Any]:
        return (self.task or {}).get("restriction", {}).get("period", {})


@dataclass(frozen=True)
class PlanState:
    careplan: dict[str, Any]
    patient: dict[str, Any] | None
    runs: dict[str, Run]  # each stage's latest run
    assignments: dict[str, str] = field(default_factory=dict)  # role -> Organization ref
    booked: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The booked chain's Appointment for each stage it books ($book-chain)."""

    @property
    def careplan_id(self) -> str:
        return str(self.careplan["id"])

    @property
    def subject(self) -> str | None:
        return self.careplan.get("subject", {}).get("reference")

    def owner(self, role: str | None) -> str | None:
        """The organisation assigned to a role in this enrolment, else the plan's author."""
        if role and role in self.assignments:
            return self.assignments[role]
        return self.careplan.get("author", {}).get("reference")


def task_run_key(task: dict[str, Any]) -> tuple[str, str, int] | None:
    """(CarePlan id, stage, run) of a Task the orchestrator wrote; None for any other."""
    key = next((i.get("value") for i in task.get("identifier", [])
                if i.get("system") == KEY_SYSTEM), None)
    parts = key.rsplit("/", 2) if isinstance(key, str) else []
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def _task_run(task: dict[str, Any], careplan_id: str) -> Run | None:
    key = task_run_key(task)
    if key is None or key[0] != careplan_id:
        return None
    _, stage, number = key
    status = task.get("status")
    outcome = ("active" if status in ACTIVE else "failed" if status in FAILED else "done")
    finished = None
    if outcome == "done":
        # When the performer says it ended, else when the server stored it as done
        # (lastModified is not used: a completing partner may leave it as it was).
        finished = parse_instant(task.get("executionPeriod", {}).get("end")
                                 or task.get("meta", {}).get("lastUpdated"))
    return Run(stage, number, outcome, task, finished)


def _skipped_runs(careplan: dict[str, Any]) -> Iterable[Run]:
    careplan_id = careplan["id"]
    for activity in careplan.get("activity", []):
        detail = activity.get("detail", {})
        key = next((e.get("valueString") for e in detail.get("extension", [])
                    if e.get("url") == KEY_EXTENSION), None)
        if key and key.startswith(careplan_id + "/") and detail.get("status") == "cancelled":
            stage, _, number = key[len(careplan_id) + 1:].rpartition("/")
            yield Run(stage, int(number), "skipped")


def role_assignments(careplan: dict[str, Any]) -> dict[str, str]:
    """Role -> Organization reference, as the enrolment assigned them."""
    assigned = {}
    for extension in careplan.get("extension", []):
        if extension.get("url") != ROLE_ASSIGNMENT:
            continue
        parts = {e.get("url"): e for e in extension.get("extension", [])}
        role = parts.get("role", {}).get("valueCode")
        reference = parts.get("organization", {}).get("valueReference", {}).get("reference")
        if role and reference:
            assigned[role] = reference
    return assigned


def plan_state(careplan: dict[str, Any], tasks: Iterable[dict[str, Any]],
               patient: dict[str, Any] | None = None,
               booked: dict[str, dict[str, Any]] | None = None) -> PlanState:
    """The latest run of each stage, from the plan's Tasks and its skipped activities."""
    runs: dict[str, Run] = {}
    candidates = [*(r for t in tasks if (r := _task_run(t, careplan["id"]))),
                  *_skipped_runs(careplan)]
    for run in candidates:
        if run.stage not in runs or run.number > runs[run.stage].number:
            runs[run.stage] = run
    return PlanState(careplan, patient, runs, role_assignments(careplan), booked or {})
