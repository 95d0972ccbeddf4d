"""Moving a booked chain: a coordinator's reschedule or cancellation, and a
manufacturing delay.

`Appointment/{id}/$reschedule` moves one appointment of a chain to another slot (or, with
a reason, to a time without a published slot). The steps before it stay where they are
and must still be reachable within their lead times; the steps after it stay too if
their lead times still hold, and otherwise move to the earliest slots that keep them.
Without `apply=true` the answer is a proposal and nothing changes; with it every move is
made in one transaction: old slots freed, new ones taken, each Appointment a new
version. What cannot be done (a lead time broken upstream, no slot downstream, the
patient busy, a slot full) is a 409 that says why, never a silent double booking.

A manufacturing delay is reported by the LIMS as a new expected release (extension
`expected-release`) on the manufacturing Task or on the product. When it is later than
the booked manufacturing appointment ends, the steps after it are re-planned as a
proposal, from the delayed release, and the enrolment's care team and partners are told
by an urgent Communication (which the `communication-sent` topic delivers to their
systems). The proposal is confirmed with $reschedule.

`CarePlan/{id}/$cancel-chain` cancels the whole booked chain with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from gateway import jsonio
from gateway.custody.coi import careplan_of_code, coi_of
from gateway.custody.excursions import alert
from gateway.errors import (
    BusinessRuleError,
    ConflictError,
    InvalidError,
    MethodNotAllowedError,
    NotFoundError,
)
from gateway.scheduling import operations as ops
from gateway.scheduling import slots as slot_store
from gateway.scheduling.directory import (
    Directory,
    SlotLoader,
    directory,
    internal,
    patient_busy,
)
from gateway.scheduling.slots import ATM
from gateway.services import access, visibility
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.parameters import arguments, text
from gateway.store.repository import Repository, Version
from gateway.store.timeparse import format_instant, micros_of, moment_of, now_micros
from orchestration.chains import ChainStep
from orchestration.scheduling import Found, OpenSlot, Query, check_chain, find_chains
from orchestration.state import KEY_SYSTEM, task_run_key

EXPECTED_RELEASE = f"{ATM}/StructureDefinition/expected-release"
TOLD = ("coordinator", "treatment-centre", "physician", "manufacturer", "courier",
        "apheresis-centre")

_RUN_KEY_SYSTEM = KEY_SYSTEM.encode()  # as it appears in a stored Task's JSON


def _chain(ctx: Context, repo: Repository, appointment: Version) -> tuple[
        ops.Enrolment, dict[str, Version]]:
    resource = appointment.resource()
    chain_id, careplan_id = ops.chain_id_of(resource), slot_store.careplan_of(resource)
    if chain_id is None or careplan_id is None:
        raise InvalidError(f"Appointment/{appointment.id} was not booked as part of a chain "
                           "($book-chain): change it with PUT or PATCH")
    return ops.enrolment_of(ctx, repo, careplan_id), ops.chain_appointments(ctx, repo, chain_id)


def _plan(ctx: Context, repo: Repository, enrolment: ops.Enrolment,
          booked: dict[str, Version], moved: int, new: OpenSlot,
          reason: str | None) -> list[tuple[str, OpenSlot]]:
    """The moves that put step `moved` at `new` and keep every lead time."""
    steps = enrolment.steps
    current = [ops.booked_slot(booked[s.stage].resource()) if s.stage in booked else None
               for s in steps]
    ignore = tuple(v.id for v in booked.values())
    busy = patient_busy(repo, enrolment.patient, enrolment.careplan_id,
                        (moment_of(0), ops.FAR), ignore)
    found_in = directory(ctx, repo, steps, enrolment.centre, (new.start, ops.FAR))
    upstream = [s for s in current[:moved] if s is not None]
    if len(upstream) == moved:
        chosen = [*upstream, new]
        query = Query(steps[:moved + 1], new.start, new.start, busy=busy)
        problem = check_chain(query, found_in.routes, found_in.services,
                              [*chosen[:-1], _as_published(new, reason)], found_in.quotas)
        if problem is not None:
            raise ConflictError(f"Cannot move {steps[moved].stage} there: {problem}")
    after = [s for s in current[moved + 1:] if s is not None]
    kept = [*[s for s in current[:moved] if s is not None], new, *after]
    if len(kept) == len(steps):
        query = Query(steps, kept[0].start, kept[0].start, busy=busy)
        if check_chain(query, found_in.routes, found_in.services,
                       [_as_published(s, reason if s is new else None) for s in kept],
                       found_in.quotas) is None:
            return [(steps[moved].stage, new)]
    pinned = {s.stage: slot for s, slot in zip(steps[:moved], current[:moved], strict=True)
              if slot is not None}
    pinned[steps[moved].stage] = new
    found = _downstream(repo, steps, pinned, moved, current, found_in, busy, timedelta(0))
    if not found.chains:
        raise ConflictError(f"No later slots keep the lead times after moving "
                            f"{steps[moved].stage}: {'; '.join(found.reasons)}")
    chain = found.chains[0]
    return [(steps[moved].stage, new)] + [
        (step.stage, slot) for step, slot, old in zip(steps[moved + 1:], chain.slots[moved + 1:],
                                                      current[moved + 1:], strict=True)
        if old is None or slot.id != old.id]


def _as_published(slot: OpenSlot, reason: str | None) -> OpenSlot:
    """check_chain treats a slot without id as booked without one (an override)."""
    return slot if slot.id or reason else OpenSlot("-", slot.service, slot.start, slot.end)


def _downstream(repo: Repository, steps: tuple[ChainStep, ...], pinned: dict[str, OpenSlot],
                moved: int, current: list[OpenSlot | None], found_in: Directory,
                busy: tuple[tuple[datetime, datetime], ...], delay: timedelta) -> Found:
    """The earliest later steps, each no earlier than it was booked plus `delay`."""
    windows = {step.stage: (old.start + delay if old is not None else moment_of(0), ops.FAR)
               for step, old in zip(steps[moved + 1:], current[moved + 1:], strict=True)}
    anchor = pinned[steps[0].stage].start
    query = Query(steps, anchor, anchor, count=1, busy=busy, windows=windows, pinned=pinned)
    return find_chains(query, found_in.routes, found_in.services, SlotLoader(repo),
                       found_in.quotas)


# -- $reschedule -----------------------------------------------------------------------------
def op_reschedule(ctx: Context, request: FhirRequest, appointment_id: str) -> FhirResponse:
    if request.method != "POST":
        raise MethodNotAllowedError("$reschedule is invoked with POST",
                                        headers={"Allow": "POST"})
    args = arguments(request)
    apply = (text(args, "apply") or "false").lower() == "true"
    if apply:
        access.check_may_create(ctx.grant, "Appointment")
    opened = ctx.writing() if apply else ctx.reading()
    with opened as repo:
        appointment = repo.read("Appointment", appointment_id)
        if appointment is None or appointment.deleted:
            raise NotFoundError(f"Appointment/{appointment_id} is not known")
        if visibility.criteria(ctx, "Appointment") is not None:
            visibility.check_visible(ctx, repo, "Appointment", appointment_id)
        enrolment, booked = _chain(ctx, repo, appointment)
        stage = ops.stage_of(appointment.resource())
        moved = next(i for i, s in enumerate(enrolment.steps) if s.stage == stage)
        choice = ops.choice(repo, enrolment.steps[moved], args)
        moves = _plan(ctx, repo, enrolment, booked, moved, choice.slot, choice.reason)
        if apply:
            _move(ctx, repo, enrolment, booked, moves, choice)
    return ops.respond([{"name": "applied", "valueBoolean": apply}, *(
        {"name": "move", "part": [
            {"name": "stage", "valueId": stage_id},
            {"name": "appointment", "valueReference": {
                "reference": f"Appointment/{booked[stage_id].id}"}},
            {"name": "from", "valueInstant": booked[stage_id].resource()["start"]},
            {"name": "to", "valueInstant": format_instant(micros_of(slot.start))},
            *([{"name": "slot", "valueReference": {"reference": f"Slot/{slot.id}"}}]
              if slot.id else [])]}
        for stage_id, slot in moves if stage_id in booked)])


def _move(ctx: Context, repo: Repository, enrolment: ops.Enrolment,
          booked: dict[str, Version], moves: list[tuple[str, OpenSlot]],
          choice: ops.Choice) -> None:
    """Every move at once: the old places freed first, so that moves may swap them."""
    for stage_id, _ in moves:
        slot_store.release_appointment(repo, booked[stage_id].id)
    for stage_id, slot in moves:
        current = booked[stage_id].resource()
        step = next(s for s in enrolment.steps if s.stage == stage_id)
        reason = choice.reason if slot is choice.slot else None
        fresh = ops.appointment_resource(ctx, enrolment, step, ops.Choice(slot, reason),
                                         ops.chain_id_of(current) or "")
        moved = {**current, "start": fresh["start"], "end": fresh["end"],
                 "participant": fresh["participant"],
                 "extension": fresh["extension"]}
        if slot.id:
            moved["slot"] = fresh["slot"]
        else:
            moved.pop("slot", None)
        version, _ = repo.update(moved, booked[stage_id].id)
        for claim in slot_store.claims_of(repo, version.resource(), enrolment.centre):
            slot_store.take(repo, claim)


# -- manufacturing delays ------------------------------------------------------------------
def expected_release(task: dict[str, Any]) -> str | None:
    return next((e.get("valueDateTime") for e in task.get("extension", [])
                 if e.get("url") == EXPECTED_RELEASE), None)


def on_task_write(ctx: Context, repo: Repository, version: Version) -> None:
    """After a Task write: a later expected release re-plans the steps after its stage."""
    if _RUN_KEY_SYSTEM not in (version.content or b""):
        return  # not one of the orchestrator's Tasks: no need to parse it to know
    task = version.resource()
    key = task_run_key(task)
    if key is not None and _release_changed(repo, version):
        careplan_id, stage, _ = key
        _delayed(ctx, repo, careplan_id, lambda steps: stage, version)


def on_product_write(ctx: Context, repo: Repository, version: Version) -> None:
    """After a BiologicallyDerivedProduct write: a later expected release re-plans the
    steps after manufacturing, for the enrolment its chain of identity names."""
    if not _release_changed(repo, version):
        return
    code = coi_of(version.resource())
    careplan = careplan_of_code(repo, code) if code else None
    if careplan is not None:
        _delayed(ctx, repo, careplan.id, _manufacturing_step, version)


def _manufacturing_step(steps: tuple[ChainStep, ...]) -> str | None:
    return next((s.stage for s in steps if s.service == "manufacturing"), None)


def _release_changed(repo: Repository, version: Version) -> bool:
    """The version carries an expected release its previous version did not."""
    release = expected_release(version.resource())
    if release is None:
        return False
    previous = (repo.vread(version.resource_type, version.id, version.version - 1)
                if version.version > 1 else None)
    return previous is None or expected_release(previous.resource()) != release


def _delayed(ctx: Context, repo: Repository, careplan_id: str,
             stage_of: Callable[[tuple[ChainStep, ...]], str | None], reported: Version) -> None:
    """The steps after the delayed one, re-planned as a proposal, and everyone told."""
    plan = repo.read("CarePlan", careplan_id)
    if plan is None or plan.deleted:
        return
    try:
        enrolment = ops.enrolment_of(internal(ctx), repo, careplan_id)
    except (InvalidError, NotFoundError, BusinessRuleError):
        return  # no chain to re-plan
    stage = stage_of(enrolment.steps)
    index = next((i for i, s in enumerate(enrolment.steps) if s.stage == stage), None)
    booked = ops.booked_chain(ctx, repo, careplan_id)
    if index is None or stage not in booked or index == len(enrolment.steps) - 1:
        return
    release = expected_release(reported.resource()) or ""
    manufacturing = ops.booked_slot(booked[enrolment.steps[index].stage].resource())
    delay = moment_of(slot_store.micros(release, f"{reported.resource_type}.extension")) - (
        manufacturing.end)
    if delay <= timedelta(0):
        return
    _propose(ctx, repo, enrolment, booked, index, manufacturing, delay, plan, reported, release)


def _propose(ctx: Context, repo: Repository, enrolment: ops.Enrolment,
             booked: dict[str, Version], index: int, manufacturing: OpenSlot,
             delay: timedelta, plan: Version, task: Version, release: str) -> None:
    steps = enrolment.steps
    current = [ops.booked_slot(booked[s.stage].resource()) if s.stage in booked else None
               for s in steps]
    shifted = OpenSlot(manufacturing.id, manufacturing.service, manufacturing.start + delay,
                       manufacturing.end + delay)
    pinned = {s.stage: slot for s, slot in zip(steps[:index], current[:index], strict=True)
              if slot is not None}
    pinned[steps[index].stage] = shifted
    busy = patient_busy(repo, enrolment.patient, enrolment.careplan_id, (moment_of(0), ops.FAR),
                        tuple(v.id for v in booked.values()))
    found_in = directory(ctx, repo, steps, enrolment.centre, (shifted.start, ops.FAR))
    found = _downstream(repo, steps, pinned, index, current, found_in, busy, delay)
    about = [{"reference": f"{task.resource_type}/{task.id}"}] + [
        {"reference": f"Appointment/{v.id}"} for v in booked.values()]
    header = (f"Manufacturing delay: the expected release is now {release}, "
              f"{delay.days} d {delay.seconds // 3600} h later than booked.")
    if not found.chains:
        alert(repo, plan, about, f"{header} No later slots keep the lead times: "
                                 f"{'; '.join(found.reasons)}. Please re-plan by hand.",
              TOLD, format_instant(now_micros()))
        return
    moves = [f"{step.stage} from {old.start:%Y-%m-%d %H:%M} to {slot.start:%Y-%m-%d %H:%M} "
             f"(Slot/{slot.id})" for step, slot, old in
             zip(steps[index + 1:], found.chains[0].slots[index + 1:], current[index + 1:],
                 strict=True) if old is not None and slot.id != old.id]
    proposal = {"resourceType": "Parameters", "parameter": [
        {"name": "move", "part": [
            {"name": "appointment", "valueReference": {
                "reference": f"Appointment/{booked[step.stage].id}"}},
            {"name": "slot", "valueReference": {"reference": f"Slot/{slot.id}"}}]}
        for step, slot in zip(steps[index + 1:], found.chains[0].slots[index + 1:], strict=True)
        if step.stage in booked]}
    alert(repo, plan, about,
          f"{header} Proposed: {'; '.join(moves) or 'no change'}. Confirm with "
          f"Appointment/{{id}}/$reschedule and apply=true. Proposal: "
          f"{jsonio.dumps(proposal).decode()}", TOLD, format_instant(now_micros()))


# -- $cancel-chain ---------------------------------------------------------------------------
def op_cancel_chain(ctx: Context, request: FhirRequest, careplan_id: str) -> FhirResponse:
    """Cancel every appointment of the enrolment's booked chain, with a reason, in one
    transaction; their slots are free again. The chain can then be booked anew."""
    if request.method != "POST":
        raise MethodNotAllowedError("$cancel-chain is invoked with POST",
                                    headers={"Allow": "POST"})
    access.check_may_create(ctx.grant, "Appointment")
    reason = text(arguments(request), "reason")
    if not reason:
        raise InvalidError("$cancel-chain needs a reason")
    with ctx.writing() as repo:
        ops.enrolment_of(ctx, repo, careplan_id)  # known, visible and following a protocol
        booked = ops.booked_chain(ctx, repo, careplan_id)
        if not booked:
            raise NotFoundError(f"CarePlan/{careplan_id} has no booked chain")
        for version in booked.values():
            cancelled, _ = repo.update({**version.resource(), "status": "cancelled",
                                        "cancelationReason": {"text": reason}}, version.id)
            slot_store.reconcile_appointment(ctx, repo, cancelled)
    return ops.respond([{"name": "cancelled", "valueReference": {
        "reference": f"Appointment/{v.id}"}} for v in booked.values()])
