"""The orchestrator's decisions for one enrolment: `decide(protocol, state, now)`.

Pure and deterministic (the clock is an argument). The rules are those of
orchestration/PROTOCOLS.md: stages start when their `after` stages are done and their
condition holds, stage Tasks complete with their sub-stages, a failed stage repeats from
its `back-to` stage a bounded number of times, else the plan is put on hold.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import fhirpathpy
from fhirpathpy.models import models as fhirpath_models

from orchestration.effects import (
    CompletePlan,
    Effect,
    HoldPlan,
    MarkOverdue,
    SetTaskStatus,
    SkipStage,
    StartStage,
)
from orchestration.protocol import ATM, Protocol, Stage
from orchestration.state import PlanState, Run, parse_instant, resource_id

BUSINESS_STATUS = f"{ATM}/CodeSystem/business-status"
OVERDUE = "overdue"
_FINISHED = ("done", "skipped")


class ConditionError(Exception):
    """A stage's condition could not be evaluated (the plan is held with the reason)."""


@lru_cache(maxsize=512)
def _compiled(expression: str) -> Any:
    return fhirpathpy.compile(expression, model=fhirpath_models["r4"])


def condition_holds(expression: str, careplan: dict[str, Any],
                    variables: dict[str, Any]) -> bool:
    """True when the FHIRPath yields exactly `true` over the CarePlan."""
    try:
        return bool(_compiled(expression)(careplan, variables) == [True])
    except Exception as exc:  # noqa: BLE001 - fhirpathpy raises many types; the plan waits
        raise ConditionError(f"{type(exc).__name__}: {exc}") from exc


def marked_overdue(task: dict[str, Any]) -> bool:
    """The orchestrator has marked this Task overdue (its businessStatus)."""
    codes = task.get("businessStatus", {}).get("coding", [])
    return any(c.get("system") == BUSINESS_STATUS and c.get("code") == OVERDUE for c in codes)


def version_reference(resource: dict[str, Any] | None) -> str | None:
    """"Type/id/_history/n" of a stored resource (the entity a Provenance names)."""
    if not resource or "id" not in resource:
        return None
    reference = f"{resource['resourceType']}/{resource['id']}"
    version = resource.get("meta", {}).get("versionId")
    return f"{reference}/_history/{version}" if version else reference


def decide(protocol: Protocol, state: PlanState, now: datetime) -> list[Effect]:
    """Everything due for this enrolment now; nothing when it is not active."""
    if state.careplan.get("status") != "active":
        return []
    return _Evaluation(protocol, state, now).run()


class _Evaluation:
    """One pass over a plan: `runs` is updated as decisions are made, so a decision can
    enable the next (a skipped stage lets its successors start) within the same pass."""

    def __init__(self, protocol: Protocol, state: PlanState, now: datetime) -> None:
        self.protocol, self.state, self.now = protocol, state, now
        self.runs: dict[str, Run] = dict(state.runs)
        # Memos of expected() and _projected_end(), valid until the runs change.
        self._expected: dict[str, int] = {}
        self._projected: dict[tuple[str, str], datetime] = {}
        self.effects: list[Effect] = []
        self.held = False

    def run(self) -> list[Effect]:
        for _ in range(4 * len(self.protocol.stages) + 4):  # each pass decides or stops
            if self.held or not self._step():
                break
        if not self.held:
            self._finish()
        return self.effects

    # -- where each stage stands -----------------------------------------------------
    def _set_run(self, run: Run) -> None:
        self.runs[run.stage] = run
        self._expected.clear()
        self._projected.clear()

    def expected(self, stage_id: str) -> int:
        """The run a stage is on: a repeat upstream (or above) moves it to a later one."""
        if stage_id in self._expected:
            return self._expected[stage_id]
        stage = self.protocol.stages[stage_id]
        run = self.runs.get(stage_id)
        number = run.number if run else 1
        for link in stage.after:
            number = max(number, self.expected(link.stage))
        if stage.parent:
            number = max(number, self.expected(stage.parent))
        self._expected[stage_id] = number
        return number

    def status(self, stage_id: str) -> str:
        run = self.runs.get(stage_id)
        if run is None or run.number < self.expected(stage_id):
            return "pending"
        return run.outcome

    def _done(self, stage_id: str) -> bool:
        return self.status(stage_id) in _FINISHED

    # -- one pass ----------------------------------------------------------------------
    def _step(self) -> bool:
        return any(self._decide_stage(stage) for stage in self.protocol.stages.values())

    def _decide_stage(self, stage: Stage) -> bool:
        run = self.runs.get(stage.id)
        status = self.status(stage.id)
        if run and run.outcome == "active" and status == "pending":
            return self._cancel_replaced(stage, run)
        if status == "pending" and self._ready(stage):
            return self._start_or_skip(stage)
        if status == "active" and stage.children and all(map(self._done, stage.children)):
            return self._complete_parent(stage, run)
        if status == "failed":
            return self._after_failure(stage, run)
        return False

    def _ready(self, stage: Stage) -> bool:
        if stage.parent and self.status(stage.parent) != "active":
            return False
        return all(self._done(link.stage) for link in stage.after)

    def _trigger(self, stage: Stage) -> dict[str, Any] | None:
        """The Task whose completion made the stage due: the last `after` stage to finish,
        else the enclosing stage's Task; None when only the enrolment itself."""
        finished = [r for link in stage.after if (r := self.runs.get(link.stage)) and r.task]
        if finished:
            latest = max(finished, key=lambda r: r.finished_at or self.now)
            return latest.task
        parent = self.runs.get(stage.parent) if stage.parent else None
        return parent.task if parent else None

    def _trigger_reference(self, task: dict[str, Any] | None) -> str | None:
        if task is not None and "resourceType" in task:
            return version_reference(task)
        return version_reference(self.state.careplan)

    # -- decisions ---------------------------------------------------------------------
    def _start_or_skip(self, stage: Stage) -> bool:
        number = self.expected(stage.id)
        trigger = self._trigger(stage)
        if stage.condition and not self._condition(stage, trigger):
            if self.held:
                return True
            self._set_run(Run(stage.id, number, "skipped", finished_at=self.now))
            self.effects.append(SkipStage(stage.id, number, self._trigger_reference(trigger),
                                          f"condition of {stage.id} not met: "
                                          f"{stage.condition}"))
            return True
        self._start(stage, number, trigger, self._due_reason(stage))
        return True

    def _due_reason(self, stage: Stage) -> str:
        if stage.after:
            names = ", ".join(link.stage for link in stage.after)
            return f"{stage.id} is due: {names} done"
        if stage.parent:
            return f"{stage.id} is due: {stage.parent} started"
        return f"{stage.id} is due: enrolment in {self.protocol.title}"

    def _condition(self, stage: Stage, trigger: dict[str, Any] | None) -> bool:
        assert stage.condition is not None
        variables = {"careplan": self.state.careplan}
        if self.state.patient is not None:
            variables["patient"] = self.state.patient
        if trigger is not None and "resourceType" in trigger:
            variables["task"] = trigger
        try:
            return condition_holds(stage.condition, self.state.careplan, variables)
        except ConditionError as exc:
            self._hold(None, f"the condition of {stage.id} could not be evaluated ({exc}); "
                             "correct the protocol or the plan, then set it active again")
            return False

    def _start(self, stage: Stage, number: int, trigger: dict[str, Any] | None,
               reason: str) -> None:
        start, end = self._window(stage)
        parent = self.runs.get(stage.parent) if stage.parent else None
        task_id = resource_id("Task", self.state.careplan_id, stage.id, number)
        period = {"start": start.isoformat(), **({"end": end.isoformat()} if end else {})}
        self._set_run(Run(stage.id, number, "active",
                          {"id": task_id, "restriction": {"period": period}}))
        self.effects.append(StartStage(
            stage.id, number, start, end, self.state.owner(stage.role),
            parent.reference if parent else None, self._trigger_reference(trigger), reason))

    def _cancel_replaced(self, stage: Stage, run: Run) -> bool:
        self._set_run(replace(run, outcome="failed"))
        if run.task and "resourceType" in run.task:
            self.effects.append(SetTaskStatus(
                stage.id, run.task, "cancelled",
                f"run {self.expected(stage.id)} of {stage.id} replaces run {run.number}"))
        return True

    def _complete_parent(self, stage: Stage, run: Run | None) -> bool:
        """A stage with sub-stages is done when they are, and ended when the last did."""
        assert run is not None
        ends = [r.finished_at for c in stage.children
                if (r := self.runs.get(c)) and r.finished_at is not None]
        ended = max(ends) if ends else self.now
        self._set_run(replace(run, outcome="done", finished_at=ended))
        if run.task and "resourceType" in run.task:
            self.effects.append(SetTaskStatus(stage.id, run.task, "completed",
                                              f"all sub-stages of {stage.id} are done", ended))
        return True

    def _after_failure(self, stage: Stage, run: Run | None) -> bool:
        assert run is not None
        failed = f"{stage.id} failed ({run.reference}, status {(run.task or {}).get('status')})"
        rule = stage.on_failure
        if rule is None:
            self._hold(run.task, f"{failed} and the protocol gives no way forward")
            return True
        target = self.runs.get(rule.back_to)
        repeats = (target.number - 1) if target else 0
        if target is None or repeats >= rule.max_repeats:
            self._hold(run.task, f"{failed}; {rule.back_to} was already repeated "
                                 f"{repeats} of at most {rule.max_repeats} times")
            return True
        self._start(self.protocol.stages[rule.back_to], target.number + 1, run.task,
                    f"{failed}: repeat {repeats + 1} of at most {rule.max_repeats} "
                    f"from {rule.back_to}")
        return True

    def _hold(self, trigger: dict[str, Any] | None, reason: str) -> None:
        self.held = True
        self.effects.append(HoldPlan(self._trigger_reference(trigger), reason))

    # -- the end of a pass ---------------------------------------------------------------
    def _finish(self) -> None:
        if all(self._done(stage.id) for stage in self.protocol.top_level()):
            self.effects.append(CompletePlan(self._last_finished(),
                                             f"every stage of {self.protocol.title} is done"))
            return
        for stage in self.protocol.stages.values():
            run = self.runs.get(stage.id)
            if run and self.status(stage.id) == "active" and self._overdue(run):
                assert run.task is not None
                end = run.period["end"]
                notify = [self.state.owner(stage.role),
                          self.state.owner(stage.escalation_role
                                           or self.protocol.escalation_role)]
                self.effects.append(MarkOverdue(
                    stage.id, run.task, tuple(dict.fromkeys(n for n in notify if n)),
                    f"{stage.id} is past its deadline {end}"))

    def _overdue(self, run: Run) -> bool:
        task = run.task or {}
        end = parse_instant(run.period.get("end"))
        if "resourceType" not in task or end is None or end >= self.now:
            return False
        return not marked_overdue(task)

    def _last_finished(self) -> str | None:
        finished = [r for r in self.runs.values() if r.task and "resourceType" in r.task]
        if not finished:
            return version_reference(self.state.careplan)
        latest = max(finished, key=lambda r: r.finished_at or self.now)
        return version_reference(latest.task)

    # -- time windows ------------------------------------------------------------------
    def _window(self, stage: Stage) -> tuple[datetime, datetime | None]:
        """restriction.period: not before the lead times allow; due after the deadline, or,
        scheduled backwards, the `ends-before` stage's projected start minus the gap."""
        start = self.now
        for link in stage.after:
            finished = self.runs[link.stage].finished_at
            if finished is not None:
                start = max(start, finished + link.offset)
        parent = self.runs.get(stage.parent) if stage.parent else None
        if parent and (parent_start := parse_instant(parent.period.get("start"))):
            start = max(start, parent_start)
        if not stage.ends_before:
            return start, (start + stage.deadline) if stage.deadline else None
        end = min(self._projected_start(link.stage, stage.id) - link.offset
                  for link in stage.ends_before)
        if stage.deadline:
            start = max(start, end - stage.deadline)
        return min(start, end), end

    def _projected_start(self, stage_id: str, exclude: str) -> datetime:
        run = self.runs.get(stage_id)
        if run and self.status(stage_id) != "pending":
            started = parse_instant(run.period.get("start"))
            return started or run.finished_at or self.now
        start = self.now
        for link in self.protocol.stages[stage_id].after:
            if link.stage != exclude:
                start = max(start, self._projected_end(link.stage, exclude) + link.offset)
        return start

    def _projected_end(self, stage_id: str, exclude: str) -> datetime:
        """When a stage is expected to end (once per stage and exclusion in a pass)."""
        key = (stage_id, exclude)
        if key not in self._projected:
            self._projected[key] = self._project_end(stage_id, exclude)
        return self._projected[key]

    def _project_end(self, stage_id: str, exclude: str) -> datetime:
        run = self.runs.get(stage_id)
        status = self.status(stage_id)
        if run and status in _FINISHED and run.finished_at:
            return run.finished_at
        if run and status == "active" and (end := parse_instant(run.period.get("end"))):
            return end
        deadline = self.protocol.stages[stage_id].deadline or timedelta(0)
        return self._projected_start(stage_id, exclude) + deadline
