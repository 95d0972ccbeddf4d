"""The Task state machine as data: every allowed change, a sample of refused ones, and the
OperationOutcome a refusal carries (https://hl7.org/fhir/R4/task.html#statemachine)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import fhir, jsonio
from gateway.errors import BusinessRuleError
from gateway.services.task_states import (
    ALLOWED,
    STATUSES,
    can_change,
    check_update,
    refusal,
)
from gateway.store.repository import Version
from tests.factories import task

TASK_STATUS = fhir.definitions()["requiredCodes"]["Task.status"]
ALLOWED_PAIRS = [(old, new) for old, targets in ALLOWED.items() for new in sorted(targets)]
REFUSED_PAIRS = [
    ("completed", "in-progress"), ("completed", "ready"), ("failed", "in-progress"),
    ("cancelled", "ready"), ("rejected", "accepted"), ("entered-in-error", "draft"),
    ("entered-in-error", "completed"), ("in-progress", "draft"), ("in-progress", "requested"),
    ("ready", "draft"), ("ready", "requested"), ("draft", "completed"),
    ("draft", "in-progress"), ("accepted", "rejected"), ("on-hold", "completed"),
    ("requested", "completed"), ("draft", "on-hold"),
]


def stored(status: str | None, deleted: bool = False) -> Version:
    content = None if deleted else jsonio.dumps(task(id="t1", status=status))
    return Version("Task", "t1", 3, 1_700_000_000_000_000, deleted, content)


def test_table_has_every_task_status_code_and_only_those() -> None:
    assert set(ALLOWED) == set(TASK_STATUS) == set(STATUSES)
    assert len(STATUSES) == len(set(STATUSES))
    for targets in ALLOWED.values():
        assert targets <= set(STATUSES)


@pytest.mark.parametrize(("old", "new"), ALLOWED_PAIRS, ids="{0[0]}->{0[1]}".format)
def test_allowed_change_is_allowed(old: str, new: str) -> None:
    assert can_change(old, new)


@pytest.mark.parametrize(("old", "new"), REFUSED_PAIRS, ids="{0[0]}->{0[1]}".format)
def test_change_outside_the_table_is_refused(old: str, new: str) -> None:
    assert new not in ALLOWED[old]
    assert not can_change(old, new)


@pytest.mark.parametrize("status", STATUSES)
def test_keeping_the_same_status_is_always_allowed(status: str) -> None:
    assert can_change(status, status)


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "entered-in-error"])
def test_every_status_but_entered_in_error_can_be_marked_entered_in_error(status: str) -> None:
    assert can_change(status, "entered-in-error")


def test_terminal_statuses_only_go_to_entered_in_error_which_goes_nowhere() -> None:
    for status in ("completed", "failed", "cancelled", "rejected"):
        assert ALLOWED[status] == {"entered-in-error"}
    assert ALLOWED["entered-in-error"] == frozenset()


@pytest.mark.parametrize("status", ["draft", "requested", "received", "accepted", "ready",
                                    "in-progress", "on-hold"])
def test_every_live_status_can_be_cancelled(status: str) -> None:
    assert can_change(status, "cancelled")


def test_ready_task_can_be_completed_directly() -> None:
    assert can_change("ready", "completed")


def test_refusal_is_a_422_business_rule_naming_both_statuses_and_the_way_out() -> None:
    error = refusal("Task/abc", "completed", "in-progress")

    assert isinstance(error, BusinessRuleError)
    assert error.status == 422
    assert error.outcome() == {"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "business-rule",
        "diagnostics": "Task/abc: status cannot change from completed to in-progress; from "
                       "completed it can only change to entered-in-error",
        "expression": ["Task.status"]}]}
    assert fhir.validate(error.outcome()) == []


def test_refusal_lists_the_allowed_statuses_in_value_set_order() -> None:
    error = refusal("Task/abc", "ready", "draft")

    assert error.diagnostics == (
        "Task/abc: status cannot change from ready to draft; from ready it can only change "
        "to cancelled, in-progress, on-hold, failed, completed, entered-in-error")


def test_refusal_from_entered_in_error_says_it_cannot_change() -> None:
    error = refusal("Task/abc", "entered-in-error", "draft")

    assert error.diagnostics == ("Task/abc: status cannot change from entered-in-error to "
                                 "draft; from entered-in-error it cannot change any more")


def test_check_update_raises_the_refusal_for_the_stored_task() -> None:
    with pytest.raises(BusinessRuleError) as caught:
        check_update(stored("completed"), task(status="in-progress"))

    assert caught.value.diagnostics.startswith(
        "Task/t1: status cannot change from completed to in-progress;")


@pytest.mark.parametrize(("current", "resource"), [
    (stored("ready"), task(status="completed")),
    (stored("completed"), task(status="completed")),
    (stored(None, deleted=True), task(status="in-progress")),
])
def test_check_update_passes_allowed_same_and_after_delete(
        current: Version, resource: dict[str, Any]) -> None:
    check_update(current, resource)
