"""The pure engine: protocol + where a plan stands + now -> effects, table by table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestration.effects import (
    CompletePlan,
    HoldPlan,
    MarkOverdue,
    SetTaskStatus,
    SkipStage,
    StartStage,
)
from orchestration.engine import decide
from orchestration.protocol import ProtocolFormError, from_plan_definition
from orchestration.state import KEY_SYSTEM, ROLE_ASSIGNMENT, plan_state, resource_id
from tests.factories.protocols import action, plan_definition

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CAREPLAN = "cp1"


def protocol(*actions: dict[str, Any], escalation: str | None = None) -> Any:
    return from_plan_definition(plan_definition(*actions, escalation=escalation))


def task(stage: str, status: str, run: int = 1, finished: datetime | None = None,
         end: datetime | None = None, **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "resourceType": "Task", "id": resource_id("Task", CAREPLAN, stage, run),
        "meta": {"versionId": "2"}, "status": status, "intent": "order",
        "identifier": [{"system": KEY_SYSTEM, "value": f"{CAREPLAN}/{stage}/{run}"}]}
    if finished:
        result["executionPeriod"] = {"end": finished.isoformat()}
    if end:
        result["restriction"] = {"period": {"start": (end - timedelta(days=1)).isoformat(),
                                            "end": end.isoformat()}}
    return {**result, **extra}


def careplan(status: str = "active", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "CarePlan", "id": CAREPLAN, "meta": {"versionId": "1"},
            "status": status, "intent": "plan", "subject": {"reference": "Patient/p1"},
            "author": {"reference": "Organization/centre"}, **extra}


def run(proto: Any, *tasks: dict[str, Any], plan: dict[str, Any] | None = None,
        now: datetime = NOW) -> list[Any]:
    return decide(proto, plan_state(plan or careplan(), tasks), now)


def started(effects: list[Any]) -> list[tuple[str, int]]:
    return [(e.stage, e.run) for e in effects if isinstance(e, StartStage)]


LINEAR = protocol(action("a"), action("b", "a"))
DIAMOND = protocol(action("a"), action("b", "a"), action("c", "a"), action("d", "b", "c"))
DONE = NOW - timedelta(hours=1)


@pytest.mark.parametrize(("proto", "tasks", "expected"), [
    (LINEAR, [], [("a", 1)]),
    (LINEAR, [task("a", "in-progress")], []),
    (LINEAR, [task("a", "completed", finished=DONE)], [("b", 1)]),
    (DIAMOND, [task("a", "completed", finished=DONE)], [("b", 1), ("c", 1)]),
    (DIAMOND, [task("a", "completed", finished=DONE), task("b", "completed", finished=DONE),
               task("c", "ready")], []),
    (DIAMOND, [task("a", "completed", finished=DONE), task("b", "completed", finished=DONE),
               task("c", "completed", finished=DONE)], [("d", 1)]),
], ids=["first-stage", "waits-for-active", "successor", "parallel-split", "join-waits",
        "join-completes"])
def test_stages_start_when_every_after_stage_is_done(proto: Any, tasks: list[Any],
                                                     expected: list[Any]) -> None:
    assert started(run(proto, *tasks)) == expected


def test_plan_completes_when_every_stage_is_done() -> None:
    effects = run(LINEAR, task("a", "completed", finished=DONE - timedelta(days=1)),
                  task("b", "completed", finished=DONE))
    assert [type(e) for e in effects] == [CompletePlan]
    assert effects[0].trigger == f"Task/{resource_id('Task', CAREPLAN, 'b', 1)}/_history/2"


@pytest.mark.parametrize("status", ["on-hold", "completed", "draft", "revoked"])
def test_plan_that_is_not_active_is_left_alone(status: str) -> None:
    assert run(LINEAR, plan=careplan(status)) == []


def test_false_condition_skips_and_lets_successor_start_in_the_same_pass() -> None:
    proto = protocol(action("a"), action("bridging", "a", when="%careplan.status = 'draft'"),
                     action("c", "bridging"))
    effects = run(proto, task("a", "completed", finished=DONE))
    assert isinstance(effects[0], SkipStage) and effects[0].stage == "bridging"
    assert effects[0].reason.startswith("condition of bridging not met")
    assert started(effects) == [("c", 1)]


def test_condition_sees_the_triggering_task_and_the_patient() -> None:
    proto = protocol(action("a"), action("b", "a", when="%task.output.exists() and "
                                                       "%patient.gender = 'female'"))
    done = task("a", "completed", finished=DONE,
                output=[{"type": {"text": "result"}, "valueString": "ok"}])
    effects = decide(proto, plan_state(careplan(), [done],
                                       {"resourceType": "Patient", "gender": "female"}), NOW)
    assert started(effects) == [("b", 1)]


def test_condition_that_fails_to_evaluate_holds_the_plan() -> None:
    proto = protocol(action("a", when="%nowhere.status = 'x'"))
    effects = run(proto)
    assert [type(e) for e in effects] == [HoldPlan]
    assert "condition of a could not be evaluated" in effects[0].reason


def test_skipped_stage_is_read_back_from_the_careplan() -> None:
    proto = protocol(action("a", when="false"), action("b", "a"))
    skipped = {"detail": {"status": "cancelled", "extension": [{
        "url": "https://atm-gateway.org/fhir/StructureDefinition/orchestration-key",
        "valueString": f"{CAREPLAN}/a/1"}]}}
    assert started(run(proto, plan=careplan(activity=[skipped]))) == [("b", 1)]


def test_failed_stage_without_a_way_forward_holds_the_plan() -> None:
    effects = run(LINEAR, task("a", "failed"))
    assert [type(e) for e in effects] == [HoldPlan]
    assert "a failed" in effects[0].reason and "no way forward" in effects[0].reason


QC = protocol(action("apheresis"), action("manufacturing", "apheresis"),
              action("qc", "manufacturing", back_to=("apheresis", 2)), action("infusion", "qc"))


def qc_history(failures: int) -> list[dict[str, Any]]:
    """`failures` runs that ended in a failed QC, the last one as it stands."""
    tasks = []
    for n in range(1, failures + 1):
        tasks += [task("apheresis", "completed", n, DONE),
                  task("manufacturing", "completed", n, DONE), task("qc", "failed", n)]
    return tasks


def test_failed_qc_repeats_from_apheresis() -> None:
    effects = run(QC, *qc_history(1))
    assert started(effects) == [("apheresis", 2)]
    assert "repeat 1 of at most 2 from apheresis" in effects[0].reason


def test_repeat_runs_each_stage_after_the_repeated_one_again() -> None:
    tasks = [*qc_history(1), task("apheresis", "completed", 2, DONE)]
    assert started(run(QC, *tasks)) == [("manufacturing", 2)]


def test_repeats_stop_at_the_limit_and_hold_the_plan() -> None:
    assert started(run(QC, *qc_history(2))) == [("apheresis", 3)]
    effects = run(QC, *qc_history(3))
    assert [type(e) for e in effects] == [HoldPlan]
    assert "apheresis was already repeated 2 of at most 2 times" in effects[0].reason


def test_a_repeat_cancels_the_stale_active_task_it_replaces() -> None:
    proto = protocol(action("a"), action("b", "a"), action("c", "a"),
                     action("check", "b", back_to=("a", 1)))
    tasks = [task("a", "completed", 1, DONE), task("b", "completed", 1, DONE),
             task("c", "in-progress", 1), task("check", "failed", 1)]
    effects = run(proto, *tasks)
    assert started(effects) == [("a", 2)]
    cancelled = [e for e in effects if isinstance(e, SetTaskStatus)]
    assert [(e.stage, e.status) for e in cancelled] == [("c", "cancelled")]


def test_sub_stages_start_with_their_parent_and_complete_it() -> None:
    proto = protocol(action("prep"), action("treatment", "prep", steps=[
        action("infusion"), action("observation", "infusion")]), action("follow-up", "treatment"))
    assert started(run(proto, task("prep", "completed", finished=DONE))) == [
        ("treatment", 1), ("infusion", 1)]
    effects = run(proto, task("prep", "completed", finished=DONE), task("treatment", "ready"),
                  task("infusion", "completed", finished=DONE),
                  task("observation", "completed", finished=DONE))
    assert [(e.stage, e.status, e.at) for e in effects if isinstance(e, SetTaskStatus)] == [
        ("treatment", "completed", DONE)]  # ended when its last sub-stage did
    assert started(effects) == [("follow-up", 1)]


def test_sub_stage_start_names_its_parent_task() -> None:
    proto = protocol(action("treatment", steps=[action("infusion")]))
    effects = run(proto, task("treatment", "ready"))
    assert effects[0].parent_task == f"Task/{resource_id('Task', CAREPLAN, 'treatment', 1)}"


def test_lead_time_and_deadline_set_the_window() -> None:
    proto = protocol(action("infusion"), action("day-7", ("infusion", 7), deadline_days=2))
    effects = run(proto, task("infusion", "completed", finished=DONE))
    assert (effects[0].start, effects[0].end) == (DONE + timedelta(days=7),
                                                 DONE + timedelta(days=9))


def test_window_starts_now_when_the_lead_time_has_passed() -> None:
    proto = protocol(action("a"), action("b", ("a", 1), deadline_days=3))
    effects = run(proto, task("a", "completed", finished=NOW - timedelta(days=5)))
    assert (effects[0].start, effects[0].end) == (NOW, NOW + timedelta(days=3))


def test_backward_scheduling_ends_before_the_projected_later_stage() -> None:
    proto = protocol(
        action("qc"), action("shipment", "qc", deadline_days=2),
        action("receipt", "shipment", deadline_days=1),
        action("lymphodepletion", "qc", deadline_days=3, ends_before=("infusion", 2)),
        action("infusion", "receipt", "lymphodepletion"))
    effects = run(proto, task("qc", "completed", finished=DONE))
    window = {e.stage: (e.start, e.end) for e in effects if isinstance(e, StartStage)}
    # infusion is projected after shipment (2 d) and receipt (1 d): in 3 days.
    assert window["lymphodepletion"] == (NOW, NOW + timedelta(days=1))
    later = run(protocol(action("qc"), action("shipment", "qc", deadline_days=10),
                         action("lympho", "qc", deadline_days=3, ends_before=("inf", 2)),
                         action("inf", "shipment", "lympho")),
                task("qc", "completed", finished=DONE))
    lympho = next(e for e in later if e.stage == "lympho")
    assert (lympho.start, lympho.end) == (NOW + timedelta(days=5), NOW + timedelta(days=8))


def test_owner_is_the_organisation_assigned_to_the_role() -> None:
    assignment = {"url": ROLE_ASSIGNMENT, "extension": [
        {"url": "role", "valueCode": "courier"},
        {"url": "organization", "valueReference": {"reference": "Organization/fast-ship"}}]}
    proto = protocol(action("ship", role="courier"), action("receive", "ship", role="centre"))
    assert run(proto, plan=careplan(extension=[assignment]))[0].owner == \
        "Organization/fast-ship"
    effects = run(proto, task("ship", "completed", finished=DONE))
    assert effects[0].owner == "Organization/centre"  # unassigned role: the plan's author


def test_overdue_task_is_escalated_once() -> None:
    proto = protocol(action("a", role="courier"), escalation="coordinator")
    late = task("a", "in-progress", end=NOW - timedelta(minutes=1))
    effects = run(proto, late)
    assert [type(e) for e in effects] == [MarkOverdue]
    assert effects[0].notify == ("Organization/centre",)
    marked = {**late, "businessStatus": {"coding": [{
        "system": "https://atm-gateway.org/fhir/CodeSystem/business-status",
        "code": "overdue"}]}}
    assert run(proto, marked) == []
    assert run(proto, task("a", "in-progress", end=NOW + timedelta(minutes=1))) == []


def test_decisions_are_deterministic() -> None:
    tasks = [task("a", "completed", finished=DONE)]
    assert run(DIAMOND, *tasks) == run(DIAMOND, *tasks)


@pytest.mark.parametrize(("actions", "message"), [
    ([action("a", "nowhere")], "related action nowhere is not one of its siblings"),
    ([action("a"), action("a")], "action id a is used twice"),
    ([action("a", back_to=("zz", 1))], "on-failure goes back to unknown action zz"),
    ([action("a"), {"id": "b", "relatedAction": [
        {"actionId": "a", "relationship": "concurrent-with-start"}]}],
     "relationship 'concurrent-with-start'; supported: after-end, after, before-start"),
])
def test_plan_definition_the_engine_cannot_run_is_refused(actions: list[Any],
                                                          message: str) -> None:
    with pytest.raises(ProtocolFormError, match=message):
        protocol(*actions)


def test_a_deep_lattice_of_joins_is_decided_in_one_pass() -> None:
    # Each layer's two stages wait for both of the layer before: 2^25 paths from the last
    # stage back to the first, which the engine must not walk one by one.
    actions = [action("a0"), action("b0")]
    for layer in range(1, 26):
        previous = (f"a{layer - 1}", f"b{layer - 1}")
        actions += [action(f"a{layer}", *previous), action(f"b{layer}", *previous)]
    proto = protocol(*actions)
    done = [task(s, "completed", finished=DONE) for n in range(25) for s in (f"a{n}", f"b{n}")]
    assert started(run(proto, *done)) == [("a25", 1), ("b25", 1)]


def test_backward_scheduling_through_a_deep_lattice_is_projected_once_per_stage() -> None:
    actions = [action("start"), action("prep", "start", deadline_days=1,
                                       ends_before=("a25", 1))]
    actions += [action("a0", "start", deadline_days=1), action("b0", "start", deadline_days=1)]
    for layer in range(1, 26):
        previous = (f"a{layer - 1}", f"b{layer - 1}")
        actions += [action(f"a{layer}", *previous, deadline_days=1),
                    action(f"b{layer}", *previous, deadline_days=1)]
    effects = run(protocol(*actions), task("start", "completed", finished=DONE))
    prep = next(e for e in effects if isinstance(e, StartStage) and e.stage == "prep")
    # a0 and b0 start now and end in a day; each later layer takes a day more, so a25 is
    # projected to start in 25 days, and prep must end a day before.
    assert prep.end == NOW + timedelta(days=24)


@pytest.mark.parametrize("key", ["garbage", f"{CAREPLAN}/a/first", "other-plan/a/1"])
def test_tasks_that_are_not_this_plans_stages_are_ignored(key: str) -> None:
    stranger = {**task("a", "completed", finished=DONE),
                "identifier": [{"system": KEY_SYSTEM, "value": key}]}
    assert started(run(LINEAR, stranger)) == [("a", 1)]
