"""What people do from the dashboard: complete or reassign a Task their organisation
owns, acknowledge an escalation, book a chain of appointments (choosing among
$find-chain's options) and move an appointment to another slot. Each is a form posted
with the session's CSRF token, done through the FHIR services as the person
(gateway/dashboard/calls.py), and its outcome, or the reason it was refused, is shown on
the page it leads back to."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from gateway.dashboard import journey_view, sessions
from gateway.dashboard.calls import Caller
from gateway.dashboard.guard import ID, field, posted_form, problem, signed_in
from gateway.dashboard.pages import render
from gateway.dashboard.sessions import Session
from gateway.errors import BusinessRuleError, FhirError, ForbiddenError, InvalidError
from orchestration.state import ACTIVE

router = APIRouter(prefix="/dashboard", include_in_schema=False)
Action = Callable[[Caller, list[tuple[str, str]], Session], Awaitable[str]]


def _action(act: Action) -> Callable[[Request], Awaitable[Response]]:
    """A form's action: CSRF checked, done as the person through the FHIR services, its
    outcome (or the OperationOutcome's reason it was refused) shown on the next page."""
    async def page(request: Request, session: Session) -> Response:
        fields = await posted_form(request, session)
        if fields is None:
            return problem(400, "Nothing was changed", "The form had expired (or came from "
                           "another site). Please reload the page and try again.")
        back = field(fields, "journey")
        target = f"/dashboard/journeys/{back}" if ID.match(back) else "/dashboard"
        call = Caller(request, session.grant)
        try:
            # The URL names what is acted on; a form field of the same name cannot.
            message = "ok:" + await act(call, [*request.path_params.items(), *fields],
                                        session)
        except FhirError as exc:
            message = f"error:{exc}"
        await run_in_threadpool(sessions.flash, request.app.state.db, session, message)
        return RedirectResponse(target, 303)
    return signed_in(page)


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _current(call: Caller, reference: str) -> tuple[dict[str, Any], str]:
    """A resource and the If-Match that guards an update of it against a lost update."""
    resource = await call.json("GET", reference)
    return resource, f'W/"{resource.get("meta", {}).get("versionId", "")}"'


async def _owned_task(call: Caller, fields: list[tuple[str, str]],
                      session: Session) -> tuple[dict[str, Any], str]:
    """The Task acted on, when it is open and the person's organisation owns it (an
    admin acts on any): the dashboard acts on what its people own."""
    task, version = await _current(call, f"Task/{field(fields, 'task_id')}")
    owner = (task.get("owner") or {}).get("reference")
    if session.role != "admin" and owner != session.organization:
        raise ForbiddenError(f"Task/{task['id']} is {owner or 'nobody'}'s: only its owner "
                             "completes or reassigns it here")
    if task.get("status") not in ACTIVE:
        raise BusinessRuleError(f"Task/{task['id']} is {task.get('status')} already")
    return task, version


async def complete_task(call: Caller, fields: list[tuple[str, str]], session: Session) -> str:
    task, version = await _owned_task(call, fields, session)
    now = _instant(datetime.now(UTC))
    period = {"start": task.get("executionPeriod", {}).get("start", now), "end": now}
    done = {**task, "status": "completed", "executionPeriod": period, "lastModified": now}
    await call("PUT", f"Task/{task['id']}", body=done, headers={"if-match": version})
    return f"{task.get('description') or 'The task'} is completed."


async def reassign_task(call: Caller, fields: list[tuple[str, str]], session: Session) -> str:
    owner = field(fields, "owner")
    if not re.match(r"^Organization/[A-Za-z0-9\-.]{1,64}$", owner):
        raise InvalidError("Choose the organisation to give the task to.")
    task, version = await _owned_task(call, fields, session)
    moved = {**task, "owner": {"reference": owner}, "lastModified": _instant(datetime.now(UTC))}
    if task.get("status") == "in-progress":  # the new owner starts it afresh
        moved["status"] = "ready"
    await call("PUT", f"Task/{task['id']}", body=moved, headers={"if-match": version})
    return f"{task.get('description') or 'The task'} is now {owner}'s."


async def acknowledge_flag(call: Caller, fields: list[tuple[str, str]],
                           session: Session) -> str:
    flag, version = await _current(call, f"Flag/{field(fields, 'flag_id')}")
    now = _instant(datetime.now(UTC))
    acknowledged = {**flag, "status": "inactive",
                    "period": {**flag.get("period", {}), "end": now},
                    "extension": [*flag.get("extension", []), {
                        "url": journey_view.ACKNOWLEDGED, "extension": [
                            {"url": "by", "valueString": session.display_name},
                            {"url": "at", "valueDateTime": now}]}]}
    await call("PUT", f"Flag/{flag['id']}", body=acknowledged, headers={"if-match": version})
    return f"Escalation acknowledged: {flag.get('code', {}).get('text', '')}"


def _slots(fields: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"name": "slot", "valueReference": {"reference": value}} for key, value in fields
            if key == "slot" and re.match(r"^Slot/[A-Za-z0-9\-.]{1,64}$", value)]


async def book_chain(call: Caller, fields: list[tuple[str, str]], session: Session) -> str:
    slots = _slots(fields)
    careplan_id = field(fields, "careplan_id")
    answer = await call.json("POST", f"CarePlan/{careplan_id}/$book-chain",
                             body={"resourceType": "Parameters", "parameter": slots})
    steps = [p for p in answer.get("parameter", []) if p.get("name") == "appointment"]
    booked = len(steps) or len(slots)
    return f"The chain is booked ({booked} appointment{'s' if booked != 1 else ''})."


async def reschedule(call: Caller, fields: list[tuple[str, str]], session: Session) -> str:
    slots = _slots(fields)
    if len(slots) != 1:
        raise InvalidError("Choose one slot to move the appointment to.")
    await call("POST", f"Appointment/{field(fields, 'appointment_id')}/$reschedule",
               body={"resourceType": "Parameters", "parameter": [
                   *slots, {"name": "apply", "valueBoolean": True}]})
    return "The appointment is moved, and the steps after it with it."


router.add_api_route("/tasks/{task_id}/complete", _action(complete_task), methods=["POST"])
router.add_api_route("/tasks/{task_id}/reassign", _action(reassign_task), methods=["POST"])
router.add_api_route("/flags/{flag_id}/acknowledge", _action(acknowledge_flag),
                     methods=["POST"])
router.add_api_route("/journeys/{careplan_id}/book", _action(book_chain), methods=["POST"])
router.add_api_route("/appointments/{appointment_id}/reschedule", _action(reschedule),
                     methods=["POST"])


# -- choosing a chain or a new slot -------------------------------------------------------
def _chains(answer: dict[str, Any]) -> list[list[dict[str, str]]]:
    """$find-chain's options: each a list of steps (stage, service, start, slot)."""
    options = []
    for chain in (p for p in answer.get("parameter", []) if p.get("name") == "chain"):
        steps = []
        for step in (p for p in chain.get("part", []) if p.get("name") == "step"):
            values: dict[str, str] = {}
            for part in step.get("part", []):
                value = next((v for k, v in part.items() if k.startswith("value")), "")
                values[part["name"]] = (value.get("display") or value.get("reference", "")
                                        if isinstance(value, dict) else str(value))
            steps.append(values)
        options.append(steps)
    return options


async def _chain_options(request: Request, session: Session) -> Response:
    careplan_id = request.path_params["careplan_id"]
    if not ID.match(careplan_id):
        return problem(404, "No such journey", "There is no journey with that id.")
    call = Caller(request, session.grant)
    try:
        answer = await call.json("POST", f"CarePlan/{careplan_id}/$find-chain", body={
            "resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": 3}]})
    except FhirError as exc:
        return problem(exc.status if exc.status < 500 else 502, "No chain can be offered",
                       str(exc))
    reasons = [i.get("diagnostics", "") for p in answer.get("parameter", [])
               if p.get("name") == "outcome" for i in p["resource"].get("issue", [])]
    return render("chains.html", session=session, careplan_id=careplan_id,
                  options=_chains(answer), reasons=reasons)


async def _slot_options(request: Request, session: Session) -> Response:
    appointment_id = request.path_params["appointment_id"]
    back = request.query_params.get("journey", "")
    if not ID.match(appointment_id) or not ID.match(back):
        return problem(404, "No such appointment", "There is no appointment with that id.")
    call = Caller(request, session.grant)
    try:
        appointment = await call.json("GET", f"Appointment/{appointment_id}")
        slot_ref = next((s["reference"] for s in appointment.get("slot", [])), None)
        schedule = ((await call.json("GET", slot_ref)).get("schedule", {}).get("reference")
                    if slot_ref else None)
        slots = [s for s in await call.search("Slot", [
            ("schedule", schedule or ""), ("status", "free"),
            ("start", f"ge{_instant(datetime.now(UTC))}"), ("_sort", "start"),
            ("_count", "13")]) if f"Slot/{s['id']}" != slot_ref][:12] if schedule else []
    except FhirError as exc:
        return problem(exc.status if exc.status < 500 else 502, "No slot can be offered",
                       str(exc))
    return render("reschedule.html", session=session, appointment=appointment, slots=slots,
                  careplan_id=back)


router.add_api_route("/journeys/{careplan_id}/chains", signed_in(_chain_options),
                     methods=["GET"])
router.add_api_route("/appointments/{appointment_id}/reschedule", signed_in(_slot_options),
                     methods=["GET"])
