"""What an ORU^R01 changes, written through the gateway's own services (validation, write
rules, the Task state machine, re-planning, the change log and so subscriptions) in the
caller's transaction: QC Observations, the qc-release Task's outcome, the expected
release on the manufacturing Task, and a Provenance naming the LIMS as their source."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from gateway.custody.coi import careplan_of_code, eye_readable
from gateway.errors import ConflictError, FhirError, PreconditionFailedError
from gateway.scheduling.replan import EXPECTED_RELEASE, expected_release
from gateway.services.context import Context
from gateway.store.repository import Repository
from mappings.hl7v2 import Header, LimsReport, QcResult, Release
from mappings.hl7v2_fields import INTERNAL, UNKNOWN_KEY, Hl7MappingError, Where
from orchestration.applier import versioned, write
from orchestration.protocol import ATM
from orchestration.state import ACTIVE, role_assignments, task_run_key
from orchestration.writes import instant

QC_RELEASE, MANUFACTURING = "qc-release", "manufacturing"  # the stages a LIMS reports on
MESSAGE_SYSTEM = f"{ATM}/sid/hl7v2-message"  # app|facility|control id
RESULT_SYSTEM = f"{ATM}/sid/hl7v2-result"  # app|facility|control id|OBX-1
_LAB = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "laboratory", "display": "Laboratory"}]}
_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


def apply(ctx: Context, report: LimsReport, now: datetime) -> list[str]:
    """Write what the report says (inside ctx's transaction); the versions written."""
    assert ctx.conn is not None, "apply runs inside the message's transaction"
    repo = Repository(ctx.conn, ctx.actor)
    careplan = careplan_of_code(repo, report.coi)
    if careplan is None:
        raise Hl7MappingError(f"chain of identity {eye_readable(report.coi)} was never "
                              "assigned to an enrolment", report.coi_at, UNKNOWN_KEY)
    plan, tasks = careplan.resource(), latest_tasks(repo, careplan.id)
    written = [_observation(ctx, report, r, plan, tasks) for r in report.results]
    if report.release is not None:
        written += _release(ctx, report.release, tasks, now)
    if report.expected_release is not None:
        written += _expected(ctx, *report.expected_release, tasks, now)
    if written:
        device, made = _device(ctx, repo, report.header)
        with _at(Where("MSH", 10)):
            write(ctx, "POST", "Provenance", provenance(report.header, [*written, *made],
                                                        device, now))
    return written


def latest_tasks(repo: Repository, careplan_id: str) -> dict[str, dict[str, Any]]:
    """The Task of each stage's latest run in an enrolment (as the orchestrator keys them)."""
    ids = [i for i, _ in repo.referring("Task", "based-on", "CarePlan", [careplan_id])]
    runs: dict[str, tuple[int, dict[str, Any]]] = {}
    for version in repo.read_many([("Task", i) for i in ids]).values():
        task = version.resource()
        key = task_run_key(task)
        if key is not None and key[0] == careplan_id and key[2] > runs.get(key[1], (0, {}))[0]:
            runs[key[1]] = (key[2], task)
    return {stage: task for stage, (_, task) in runs.items()}


@contextmanager
def _at(where: Where) -> Iterator[None]:
    """A write the gateway refuses fails the message, naming the part that asked for it."""
    try:
        yield
    except (PreconditionFailedError, ConflictError):
        raise  # a concurrent write got there first: the message is tried again
    except FhirError as exc:
        said = "; ".join(i.diagnostics for i in exc.issues if i.diagnostics) or str(exc)
        raise Hl7MappingError(f"the gateway refused it: {said}", where, INTERNAL) from exc


def _observation(ctx: Context, report: LimsReport, result: QcResult,
                 plan: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> str:
    """A QC result about the product: based on the enrolment and on the manufacturing
    order (R4 has no search by a product's identifier to name the product itself)."""
    header = report.header
    observation: dict[str, Any] = {
        "resourceType": "Observation", **result.observation, "category": [_LAB],
        "identifier": [{"system": RESULT_SYSTEM, "value": "|".join(
            (header.application, header.facility, header.control_id, result.identifier))}],
        "basedOn": [{"reference": f"CarePlan/{plan['id']}"}]}
    order = tasks.get(MANUFACTURING, {}).get("focus", {}).get("reference", "")
    if order.startswith("ServiceRequest/"):
        observation["basedOn"].append({"reference": order})
    if str(plan.get("subject", {}).get("reference", "")).startswith("Patient/"):
        observation["subject"] = plan["subject"]
    if manufacturer := role_assignments(plan).get("manufacturer"):
        observation["performer"] = [{"reference": manufacturer}]
    with _at(result.where):
        return versioned(write(ctx, "POST", "Observation", observation))


def _stage_task(tasks: dict[str, dict[str, Any]], stage: str, where: Where) -> dict[str, Any]:
    task = tasks.get(stage)
    if task is None:
        raise Hl7MappingError(f"the enrolment has no {stage} Task yet (it has not reached "
                              f"that stage); the message is kept: replay it once it has",
                              where, INTERNAL)
    return task


def _release(ctx: Context, release: Release, tasks: dict[str, dict[str, Any]],
             now: datetime) -> list[str]:
    """The qc-release Task completed, or failed with the LIMS's reason."""
    task = _stage_task(tasks, QC_RELEASE, release.where)
    status = "completed" if release.released else "failed"
    if task.get("status") == status:
        return []  # already known (reported twice, or over REST as well)
    if task.get("status") not in ACTIVE:
        raise Hl7MappingError(f"Task/{task['id']} (qc-release) is already "
                              f"{task.get('status')}: a decision is not reversed by a "
                              "message; correct it by hand", release.where, INTERNAL)
    updated = {**task, "status": status, "lastModified": instant(now)}
    if release.released:
        updated["executionPeriod"] = {**task.get("executionPeriod", {}),
                                      "end": release.at or instant(now)}
        if release.reason:
            updated["note"] = [*task.get("note", []), {"text": release.reason}]
    else:
        updated["statusReason"] = {"text": release.reason or
                                   "the batch failed QC release (the LIMS gave no reason)"}
    with _at(release.where):
        return [_update(ctx, updated, task)]


def _expected(ctx: Context, where: Where, release: str, tasks: dict[str, dict[str, Any]],
              now: datetime) -> list[str]:
    """The manufacturing Task's expected release: a later one re-plans what follows."""
    task = _stage_task(tasks, MANUFACTURING, where)
    if expected_release(task) == release:
        return []
    others = [e for e in task.get("extension", []) if e.get("url") != EXPECTED_RELEASE]
    updated = {**task, "lastModified": instant(now), "extension": [
        *others, {"url": EXPECTED_RELEASE, "valueDateTime": release}]}
    with _at(where):
        return [_update(ctx, updated, task)]


def _update(ctx: Context, task: dict[str, Any], read: dict[str, Any]) -> str:
    version = read.get("meta", {}).get("versionId")
    return versioned(write(ctx, "PUT", f"Task/{task['id']}", task,
                           if_match=f'W/"{version}"' if version else None))


def device_id(header: Header) -> str:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{header.application}-{header.facility}")
    return ("hl7-" + slug.strip("-"))[:64].rstrip("-") or "hl7-unknown"


def _device(ctx: Context, repo: Repository, header: Header) -> tuple[str, list[str]]:
    """The Device standing for the sending application (written the first time)."""
    reference = f"Device/{device_id(header)}"
    found = repo.read("Device", device_id(header))
    if found is not None and not found.deleted:
        return reference, []
    name = " at ".join(p for p in (header.application, header.facility) if p) or "unknown"
    with _at(Where("MSH", 3)):
        device = write(ctx, "PUT", reference, {
            "resourceType": "Device", "id": device_id(header), "status": "active",
            "deviceName": [{"name": f"{name} (HL7 v2)", "type": "user-friendly-name"}],
            "type": {"text": "Laboratory information management system (LIMS)"}})
    return reference, [versioned(device)]


def provenance(header: Header, targets: list[str], device: str, now: datetime) -> dict[str, Any]:
    """Who (the LIMS, as a Device), what it changed, from which message."""
    message = f"{header.message_type} {header.control_id}"
    updated = any(t.startswith("Task/") for t in targets)
    return {
        "resourceType": "Provenance", "target": [{"reference": t} for t in targets],
        "recorded": instant(now),
        "reason": [{"text": f"HL7 v2 {message} from "
                            f"{header.application}^{header.facility}"}],
        "activity": {"coding": [{"system": _DATA_OPERATION,
                                 "code": "UPDATE" if updated else "CREATE"}]},
        "agent": [{"type": {"coding": [{"system": _PARTICIPANT_TYPE, "code": "author",
                                        "display": "Author"}]},
                   "who": {"reference": device}}],
        "entity": [{"role": "source", "what": {
            "identifier": {"system": MESSAGE_SYSTEM, "value": "|".join(
                (header.application, header.facility, header.control_id))},
            "display": message}}]}
