"""The FHIR resources the orchestrator writes for each effect. Pure: values in, dicts out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orchestration.effects import MarkOverdue, SkipStage, StartStage
from orchestration.engine import BUSINESS_STATUS, OVERDUE
from orchestration.protocol import ATM, STAGE_SYSTEM, Protocol, Stage
from orchestration.state import (
    KEY_EXTENSION,
    KEY_SYSTEM,
    PlanState,
    resource_id,
    run_key,
    task_run_key,
)

DEVICE = "Device/atm-orchestrator"
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"


BOOKED_INPUT = "booked appointment"  # Task.input naming the step's booked Appointment


def instant(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def orchestrator_device() -> dict[str, Any]:
    return {"resourceType": "Device", "id": DEVICE.split("/")[1], "status": "active",
            "deviceName": [{"name": "ATM Gateway orchestrator", "type": "user-friendly-name"}],
            "type": {"text": "Therapy orchestration engine"}}


def _stage_code(stage: Stage) -> dict[str, Any]:
    return {"coding": [{"system": STAGE_SYSTEM, "code": stage.id, "display": stage.title}],
            "text": stage.title}


def _key(state: PlanState, effect: StartStage) -> dict[str, str]:
    return {"system": KEY_SYSTEM, "value": run_key(state.careplan_id, effect.stage, effect.run)}


def stage_resources(protocol: Protocol, state: PlanState, effect: StartStage,
                    now: datetime) -> list[dict[str, Any]]:
    """The stage's Task, preceded by the ServiceRequest or Appointment it is about."""
    stage = protocol.stages[effect.stage]
    task_id = resource_id("Task", state.careplan_id, stage.id, effect.run)
    period = {"start": instant(effect.start), **({"end": instant(effect.end)}
                                                  if effect.end else {})}
    task: dict[str, Any] = {
        "resourceType": "Task", "id": task_id, "identifier": [_key(state, effect)],
        "status": "ready", "intent": "order", "code": _stage_code(stage),
        "description": stage.title, "basedOn": [{"reference": f"CarePlan/{state.careplan_id}"}],
        "authoredOn": instant(now), "lastModified": instant(now),
        "restriction": {"period": period}}
    if stage.definition:
        task["instantiatesCanonical"] = stage.definition
    if effect.parent_task:
        task["partOf"] = [{"reference": effect.parent_task}]
    if state.subject:
        task["for"] = {"reference": state.subject}
    if effect.owner:
        task["owner"] = {"reference": effect.owner}
    booked = state.booked.get(stage.id)
    if booked is not None:
        # Its chain was booked in one go: the Task names that appointment, and needs no
        # proposed one of its own (its focus stays free for the product handed over).
        task["input"] = [{"type": {"text": BOOKED_INPUT},
                          "valueReference": {"reference": f"Appointment/{booked['id']}"}}]
        if stage.kind == "Appointment":
            return [task]
    focus = _focus(stage, state, effect, now)
    if focus is None:
        return [task]
    task["focus"] = {"reference": f"{focus['resourceType']}/{focus['id']}"}
    return [focus, task]


def _focus(stage: Stage, state: PlanState, effect: StartStage,
           now: datetime) -> dict[str, Any] | None:
    if stage.kind == "ServiceRequest":
        request: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "id": resource_id("ServiceRequest", state.careplan_id, stage.id, effect.run),
            "identifier": [_key(state, effect)], "status": "active", "intent": "order",
            "code": _stage_code(stage), "authoredOn": instant(now),
            "basedOn": [{"reference": f"CarePlan/{state.careplan_id}"}],
            "subject": {"reference": state.subject or f"CarePlan/{state.careplan_id}"}}
        if stage.definition:
            request["instantiatesCanonical"] = [stage.definition]
        if effect.owner:
            request["performer"] = [{"reference": effect.owner}]
        return request
    if stage.kind == "Appointment":
        appointment: dict[str, Any] = {
            "resourceType": "Appointment",
            "id": resource_id("Appointment", state.careplan_id, stage.id, effect.run),
            "identifier": [_key(state, effect)], "status": "proposed",
            "serviceType": [_stage_code(stage)], "description": stage.title,
            "requestedPeriod": [{"start": instant(effect.start),
                                 **({"end": instant(effect.end)} if effect.end else {})}],
            "participant": [{"actor": {"reference": state.subject}, "status": "needs-action"}]
            if state.subject else [{"type": [{"text": "patient"}], "status": "needs-action"}]}
        return appointment
    return None


def skipped_activity(state: PlanState, protocol: Protocol, effect: SkipStage) -> dict[str, Any]:
    """A CarePlan.activity saying the stage was not needed (so the plan reads complete)."""
    stage = protocol.stages[effect.stage]
    detail: dict[str, Any] = {
        "extension": [{"url": KEY_EXTENSION,
                       "valueString": run_key(state.careplan_id, stage.id, effect.run)}],
        "kind": "Task", "code": _stage_code(stage), "status": "cancelled",
        "statusReason": {"text": "condition not met"}, "description": effect.reason}
    if stage.definition:
        detail["instantiatesCanonical"] = [stage.definition]
    return {"detail": detail}


def overdue_resources(state: PlanState, effect: MarkOverdue,
                      now: datetime) -> list[dict[str, Any]]:
    """The Task marked overdue, a Flag on the patient, a Communication to those told."""
    task = {**effect.task, "businessStatus": {
        "coding": [{"system": BUSINESS_STATUS, "code": OVERDUE, "display": "Overdue"}],
        "text": "overdue"}, "lastModified": instant(now)}
    about = {"reference": f"Task/{task['id']}"}
    subject = {"reference": state.subject} if state.subject else about
    flag = {"resourceType": "Flag",
            "id": resource_id("Flag", state.careplan_id, effect.stage, _run(effect)),
            "status": "active", "subject": subject, "period": {"start": instant(now)},
            "category": [{"coding": [{"system": _FLAG_CATEGORY, "code": "admin",
                                      "display": "Administrative"}]}],
            "code": {"text": f"Overdue: {task.get('description', effect.stage)}"},
            "extension": [{"url": f"{ATM}/StructureDefinition/flag-about",
                           "valueReference": about}]}
    communication: dict[str, Any] = {
        "resourceType": "Communication",
        "id": resource_id("Communication", state.careplan_id, effect.stage, _run(effect)),
        "status": "completed", "sent": instant(now), "about": [about],
        "basedOn": [{"reference": f"CarePlan/{state.careplan_id}"}],
        "payload": [{"contentString": f"{effect.reason}. Please act on it or re-plan it."}],
        "sender": {"reference": DEVICE}}
    if state.subject:
        communication["subject"] = {"reference": state.subject}
    if effect.notify:
        communication["recipient"] = [{"reference": r} for r in effect.notify]
    return [task, flag, communication]


def _run(effect: MarkOverdue) -> int:
    key = task_run_key(effect.task)
    assert key is not None  # overdue Tasks are the orchestrator's
    return key[2]


def provenance(targets: list[str], entity: str | None, reason: str, activity: str,
               now: datetime) -> dict[str, Any]:
    """Who (the orchestrator), what it wrote, from which version, and why."""
    result: dict[str, Any] = {
        "resourceType": "Provenance", "target": [{"reference": t} for t in targets],
        "recorded": instant(now), "reason": [{"text": reason}],
        "activity": {"coding": [{"system": _DATA_OPERATION, "code": activity}]},
        "agent": [{"type": {"coding": [{"system": _PARTICIPANT_TYPE, "code": "assembler",
                                        "display": "Assembler"}]},
                   "who": {"reference": DEVICE}}]}
    if entity:
        result["entity"] = [{"role": "source", "what": {"reference": entity}}]
    return result
