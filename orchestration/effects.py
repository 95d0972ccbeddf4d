"""What the engine decides: imperative effects, each with the reason a Provenance will
carry. The runner turns them into FHIR writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class StartStage:
    """Write run `run` of a stage: its Task (and ServiceRequest or Appointment)."""

    stage: str
    run: int
    start: datetime
    end: datetime | None
    owner: str | None
    parent_task: str | None  # "Task/<id>" of the enclosing stage's run
    trigger: str | None  # "Task/<id>/_history/<n>" whose completion made it due
    reason: str


@dataclass(frozen=True)
class SkipStage:
    stage: str
    run: int
    trigger: str | None
    reason: str


@dataclass(frozen=True)
class SetTaskStatus:
    """Complete a stage Task whose sub-stages are done, or cancel one a repeat replaced."""

    stage: str
    task: dict[str, Any]
    status: str
    reason: str
    at: datetime | None = None  # when it ended: a parent ends with its last sub-stage


@dataclass(frozen=True)
class MarkOverdue:
    stage: str
    task: dict[str, Any]
    notify: tuple[str, ...]  # references told: the owner, then the escalation role
    reason: str


@dataclass(frozen=True)
class HoldPlan:
    trigger: str | None
    reason: str


@dataclass(frozen=True)
class CompletePlan:
    trigger: str | None
    reason: str


Effect = StartStage | SkipStage | SetTaskStatus | MarkOverdue | HoldPlan | CompletePlan
