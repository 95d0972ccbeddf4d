"""One advance's writes: the effects the engine decided, as FHIR writes through the
gateway's own services (validation, the Task state machine, indexing, the change log),
each with its Provenance, and the CarePlan written once with every change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.router import dispatch
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
from orchestration.engine import version_reference
from orchestration.protocol import Protocol
from orchestration.state import PlanState


def write(ctx: Context, method: str, path: str, resource: dict[str, Any],
          *, assigned_id: str | None = None, if_match: str | None = None) -> dict[str, Any]:
    """One write through the same services as a client's; the stored resource."""
    headers = {"if-match": if_match} if if_match else {}
    response: FhirResponse = dispatch(ctx, FhirRequest(
        method=method, path=path, headers=headers, body=orjson.dumps(resource),
        content_type="application/fhir+json", assigned_id=assigned_id))
    assert response.body is not None
    stored: dict[str, Any] = orjson.loads(response.body)
    return stored


def versioned(resource: dict[str, Any]) -> str:
    """"Type/id/_history/n" of a resource the store has just answered with."""
    reference = version_reference(resource)
    assert reference is not None
    return reference


class Writer:
    """Writes one advance's effects: each effect's resources and its Provenance, then
    the CarePlan once with every activity and status change."""

    def __init__(self, ctx: Context, protocol: Protocol, state: PlanState,
                 now: datetime) -> None:
        self.ctx, self.protocol, self.state, self.now = ctx, protocol, state, now
        self.careplan = dict(state.careplan)
        self.careplan_changed = False
        # Each effect's Provenance: targets, entity, reason, activity, and whether the
        # CarePlan's new version is among its targets (known once it is written).
        self.pending: list[tuple[list[str], str | None, str, str, bool]] = []

    def apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            self._apply(effect)
        plan_version = versioned(self._save_careplan()) if self.careplan_changed else None
        for targets, entity, reason, activity, touches_plan in self.pending:
            if touches_plan and plan_version:
                targets = [*targets, plan_version]
            write(self.ctx, "POST", "Provenance",
                   writes.provenance(targets, entity, reason, activity, self.now))

    def _record(self, written: list[dict[str, Any]], entity: str | None, reason: str,
                activity: str, *, touches_plan: bool = False) -> None:
        self.pending.append(([versioned(r) for r in written], entity, reason, activity,
                             touches_plan))

    def _apply(self, effect: Effect) -> None:
        if isinstance(effect, StartStage):
            written = [write(self.ctx, "POST", r["resourceType"], r, assigned_id=r["id"])
                       for r in writes.stage_resources(self.protocol, self.state, effect,
                                                       self.now)]
            task = written[-1]
            self._add_activity({"reference": {"reference": f"Task/{task['id']}",
                                              "display": task.get("description")}})
            self._record(written, effect.trigger, effect.reason, "CREATE", touches_plan=True)
        elif isinstance(effect, SkipStage):
            self._add_activity(writes.skipped_activity(self.state, self.protocol, effect))
            self._record([], effect.trigger, effect.reason, "UPDATE", touches_plan=True)
        elif isinstance(effect, SetTaskStatus):
            self._record([self._set_status(effect)], versioned(effect.task), effect.reason,
                         "UPDATE")
        elif isinstance(effect, MarkOverdue):
            task, flag, communication = writes.overdue_resources(self.state, effect, self.now)
            written = [self._update(task, effect.task),
                       write(self.ctx, "POST", "Flag", flag, assigned_id=flag["id"]),
                       write(self.ctx, "POST", "Communication", communication,
                              assigned_id=communication["id"])]
            self._record(written, versioned(effect.task), effect.reason, "UPDATE")
        elif isinstance(effect, HoldPlan | CompletePlan):
            self._close_plan(effect)
            self._record([], effect.trigger, effect.reason, "UPDATE", touches_plan=True)

    def _set_status(self, effect: SetTaskStatus) -> dict[str, Any]:
        task = {**effect.task, "status": effect.status, "lastModified": writes.instant(self.now)}
        if effect.status == "completed":
            task["executionPeriod"] = {**task.get("executionPeriod", {}),
                                       "end": writes.instant(effect.at or self.now)}
        else:
            task["statusReason"] = {"text": effect.reason}
        return self._update(task, effect.task)

    def _update(self, task: dict[str, Any], read: dict[str, Any]) -> dict[str, Any]:
        version = read.get("meta", {}).get("versionId")
        return write(self.ctx, "PUT", f"Task/{task['id']}", task,
                      if_match=f'W/"{version}"' if version else None)

    def _add_activity(self, activity: dict[str, Any]) -> None:
        self.careplan["activity"] = [*self.careplan.get("activity", []), activity]
        self.careplan_changed = True

    def _close_plan(self, effect: HoldPlan | CompletePlan) -> None:
        if isinstance(effect, HoldPlan):
            self.careplan["status"] = "on-hold"
        else:
            self.careplan["status"] = "completed"
            self.careplan["period"] = {**self.careplan.get("period", {}),
                                       "end": writes.instant(self.now)}
        self.careplan["note"] = [*self.careplan.get("note", []),
                                 {"time": writes.instant(self.now), "text": effect.reason}]
        self.careplan_changed = True

    def _save_careplan(self) -> dict[str, Any]:
        careplan = self.careplan  # meta (tags, security labels) kept: the server re-stamps
        version = self.state.careplan.get("meta", {}).get("versionId")
        return write(self.ctx, "PUT", f"CarePlan/{careplan['id']}", careplan,
                     if_match=f'W/"{version}"' if version else None)

