"""The multi-step scheduling operations.

- `CarePlan/{id}/$find-chain` (GET or POST), and `CarePlan/$find-chain` with a protocol
  and a patient: ranked chains of slots, one per step of the protocol's booking stage,
  or the reasons there are none.
- `CarePlan/{id}/$hold-chain`: holds a chain's slots for a few minutes.
- `CarePlan/{id}/$book-chain`: books a chain (held, chosen, or with steps booked without
  a published slot, each with a reason) as Appointments in ONE transaction, and completes
  the enrolment's booking Task so that the orchestrator moves on.
- `Appointment/{id}/$reschedule`: moves one appointment of a chain and proposes (or, with
  `apply=true`, makes) the moves downstream that keep the lead times.

A slot taken by someone else between the search and the booking is a 409 whose
OperationOutcome contains a Parameters of fresh chains (`#alternatives`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from gateway import jsonio
from gateway.custody.handoffs import compiled_protocol
from gateway.errors import (
    ConflictError,
    InvalidError,
    Issue,
    MethodNotAllowedError,
    NotFoundError,
    operation_outcome,
)
from gateway.scheduling import slots as slot_store
from gateway.scheduling.directory import (
    Directory,
    SlotLoader,
    directory,
    internal,
    patient_busy,
)
from gateway.scheduling.slots import (
    ATM,
    Claim,
    SlotTakenError,
    local_id,
    refused,
    treatment_centre,
)
from gateway.services import access, visibility
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.parameters import arguments, instant, named, number, text
from gateway.services.search import match_ids
from gateway.store.repository import Repository, Version, new_id
from gateway.store.schema import schedule_claims, schedule_slots
from gateway.store.timeparse import format_instant, micros_of, moment_of, now_micros
from orchestration.chains import PRIORITIES, ChainStep
from orchestration.protocol import Protocol
from orchestration.scheduling import (
    Found,
    OpenSlot,
    Query,
    check_chain,
    find_chains,
)
from orchestration.state import task_run_key
from orchestration.writes import BOOKED_INPUT

CHAIN_SYSTEM = f"{ATM}/sid/chain"  # the identifier shared by one chain's Appointments
CHAIN_STEP = f"{ATM}/StructureDefinition/chain-step"  # the stage an Appointment books
OVERRIDE = f"{ATM}/StructureDefinition/booking-override"
DEFAULT_HORIZON = timedelta(days=90)
MAX_HORIZON = timedelta(days=366)
DEFAULT_COUNT, MAX_COUNT = 5, 50
DEFAULT_HOLD, MAX_HOLD = 15, 60  # minutes
FAR = datetime(9999, 1, 1, tzinfo=UTC)


# -- the enrolment and its chain ---------------------------------------------------------
@dataclass(frozen=True)
class Enrolment:
    """Who is being booked, for which chain of which protocol."""

    careplan: Version | None
    patient: str | None
    protocol: Protocol
    steps: tuple[ChainStep, ...]
    booking_stage: str
    centre: str | None

    @property
    def careplan_id(self) -> str | None:
        return self.careplan.id if self.careplan is not None else None


def _chain_of(protocol: Protocol) -> tuple[str, tuple[ChainStep, ...]]:
    stage = protocol.booking_stage()
    if stage is None:
        raise refused(f"Protocol {protocol.canonical} has no stage that books a chain "
                      "(`books:`)", "CarePlan.instantiatesCanonical")
    return stage.id, stage.books


def enrolment_of(ctx: Context, repo: Repository, careplan_id: str) -> Enrolment:
    careplan = repo.read("CarePlan", careplan_id)
    if careplan is None or careplan.deleted:
        raise NotFoundError(f"CarePlan/{careplan_id} is not known")
    if visibility.criteria(ctx, "CarePlan") is not None:
        visibility.check_visible(ctx, repo, "CarePlan", careplan_id)
    plan = careplan.resource()
    protocol = compiled_protocol(ctx, repo, plan)
    if protocol is None:
        raise refused(f"CarePlan/{careplan_id} follows no protocol of this server",
                      "CarePlan.instantiatesCanonical")
    stage, steps = _chain_of(protocol)
    return Enrolment(careplan, plan.get("subject", {}).get("reference"), protocol, steps,
                     stage, treatment_centre(plan))


def _typeenrolment_of(ctx: Context, repo: Repository,
                    args: list[dict[str, Any]]) -> Enrolment:
    """CarePlan/$find-chain: the protocol and patient are given, nobody is enrolled yet."""
    canonical = text(args, "protocol")
    if canonical is None:
        raise InvalidError("CarePlan/$find-chain needs a protocol (the PlanDefinition's "
                           "canonical URL) and a patient")
    protocol = compiled_protocol(ctx, repo, {"instantiatesCanonical": [canonical]})
    if protocol is None:
        raise NotFoundError(f"No protocol {canonical} is stored here")
    stage, steps = _chain_of(protocol)
    patient = text(args, "patient")
    if patient is not None and local_id({"reference": patient}, "Patient") is None:
        raise InvalidError("Parameter patient must be a reference Patient/<id>")
    return Enrolment(None, patient, protocol, steps, stage, text(args, "organization"))


def _query(repo: Repository, enrolment: Enrolment, args: list[dict[str, Any]],
           ignore: tuple[str, ...] = ()) -> Query:
    earliest = instant(args, "start") or moment_of(now_micros())
    latest = instant(args, "end") or earliest + DEFAULT_HORIZON
    if latest < earliest or latest - earliest > MAX_HORIZON:
        raise InvalidError(f"end must follow start by at most {MAX_HORIZON.days} days")
    priority = text(args, "priority")
    if priority is not None and priority not in PRIORITIES:
        raise InvalidError(f"priority is one of {', '.join(PRIORITIES)}")
    return Query(enrolment.steps, earliest, latest, priority,
                 number(args, "count", DEFAULT_COUNT, MAX_COUNT),
                 patient_busy(repo, enrolment.patient, enrolment.careplan_id,
                              (earliest, FAR), ignore))


def _directory(ctx: Context, repo: Repository, enrolment: Enrolment, query: Query) -> Directory:
    return directory(ctx, repo, enrolment.steps, enrolment.centre,
                     (query.earliest, query.latest + timedelta(days=366)))


def search(ctx: Context, repo: Repository, enrolment: Enrolment,
           query: Query) -> tuple[Found, Directory]:
    found_in = _directory(ctx, repo, enrolment, query)
    return find_chains(query, found_in.routes, found_in.services, SlotLoader(repo),
                       found_in.quotas), found_in


# -- rendering ---------------------------------------------------------------------------
def _reference(reference: str | None, display: str | None = None) -> dict[str, Any]:
    return {"reference": reference, **({"display": display} if display else {})}


def _step_part(step: ChainStep, slot: OpenSlot, found_in: Directory) -> dict[str, Any]:
    service = found_in.services.get(slot.service)
    parts: list[dict[str, Any]] = [
        {"name": "stage", "valueId": step.stage},
        {"name": "service", "valueReference": _reference(slot.service,
                                                         service.name if service else None)}]
    if service is not None and service.location:
        parts.append({"name": "location", "valueReference": _reference(service.location)})
    if slot.id:
        parts.append({"name": "slot", "valueReference": _reference(f"Slot/{slot.id}")})
    parts += [{"name": "start", "valueInstant": format_instant(micros_of(slot.start))},
              {"name": "end", "valueInstant": format_instant(micros_of(slot.end))}]
    return {"name": "step", "part": parts}


def chainsrespond(found: Found, found_in: Directory,
                      steps: tuple[ChainStep, ...]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    for rank, chain in enumerate(found.chains, 1):
        parts: list[dict[str, Any]] = [{"name": "rank", "valueInteger": rank},
                                       {"name": "priority", "valueInteger": chain.route.priority}]
        if chain.route.name:
            parts.append({"name": "route", "valueReference": _reference(chain.route.name)})
        parts += [_step_part(step, slot, found_in)
                  for step, slot in zip(steps, chain.slots, strict=True)]
        parameters.append({"name": "chain", "part": parts})
    if not found.chains:
        parameters.append({"name": "outcome", "resource": operation_outcome(
            [Issue("not-found", reason, severity="warning") for reason in found.reasons])})
    return {"resourceType": "Parameters", "parameter": parameters}


def respond(parameters: list[dict[str, Any]]) -> FhirResponse:
    return FhirResponse(200, jsonio.dumps({"resourceType": "Parameters",
                                           "parameter": parameters}))


class ChainTakenError(ConflictError):
    """A chosen slot was taken meanwhile: the outcome carries fresh chains."""

    def __init__(self, message: str, alternatives: dict[str, Any]) -> None:
        super().__init__(message + "; fresh chains are in the contained Parameters "
                                   "#alternatives")
        self.alternatives = alternatives

    def outcome(self) -> dict[str, Any]:
        return {**super().outcome(), "contained": [{**self.alternatives, "id": "alternatives"}]}


def _alternatives(ctx: Context, careplan_id: str, args: list[dict[str, Any]],
                  exc: SlotTakenError) -> ChainTakenError:
    with ctx.reading() as repo:
        enrolment = enrolment_of(ctx, repo, careplan_id)
        query = _query(repo, enrolment, [a for a in args if a.get("name") in
                                         ("start", "end", "priority", "count")])
        found, found_in = search(ctx, repo, enrolment, query)
    return ChainTakenError(str(exc), chainsrespond(found, found_in, enrolment.steps))


@contextmanager
def _offering_alternatives(ctx: Context, careplan_id: str,
                           args: list[dict[str, Any]]) -> Iterator[None]:
    try:
        yield
    except SlotTakenError as exc:
        raise _alternatives(ctx, careplan_id, args, exc) from exc


# -- $find-chain ---------------------------------------------------------------------------
def op_find_chain(ctx: Context, request: FhirRequest, careplan_id: str | None) -> FhirResponse:
    args = arguments(request)
    with ctx.reading() as repo:
        enrolment = (enrolment_of(ctx, repo, careplan_id) if careplan_id is not None
                     else _typeenrolment_of(ctx, repo, args))
        query = _query(repo, enrolment, args)
        found, found_in = search(ctx, repo, enrolment, query)
    return FhirResponse(200, jsonio.dumps(chainsrespond(found, found_in, enrolment.steps)))


# -- choosing slots ------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """One step as the caller chose it: a published slot, or a time at a service with the
    reason for booking it without a slot."""

    slot: OpenSlot
    reason: str | None = None


def _steps_given(args: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Each chosen step's parts: from a `chain` (as $find-chain returns it), from `step`
    parameters, or from plain `slot` references in step order."""
    chains = named(args, "chain")
    if len(chains) > 1:
        raise InvalidError("Give one chain")
    source = chains[0].get("part", []) if chains else args
    steps = [p.get("part", []) for p in named(source, "step")]
    if steps:
        return steps
    return [[{"name": "slot", **{k: v for k, v in p.items() if k != "name"}}]
            for p in named(args, "slot")]


def choices(repo: Repository, args: list[dict[str, Any]],
             steps: tuple[ChainStep, ...]) -> list[Choice]:
    given = _steps_given(args)
    if len(given) != len(steps):
        raise InvalidError(f"The chain has {len(steps)} steps ({', '.join(s.stage for s in steps)}"
                           f"); {len(given)} were given")
    return [choice(repo, step, parts) for step, parts in zip(steps, given, strict=True)]


def choice(repo: Repository, step: ChainStep, parts: list[dict[str, Any]]) -> Choice:
    """A step as given: its `slot`, or its `service`, `start`, `end` and `reason`."""
    stage = text(parts, "stage")
    if stage is not None and stage != step.stage:
        raise InvalidError(f"Steps are given in chain order: {step.stage} was expected, "
                           f"not {stage}")
    slot = text(parts, "slot")
    if slot is not None:
        return Choice(_published(repo, slot))
    reason, service = text(parts, "reason"), text(parts, "service")
    start, end = instant(parts, "start"), instant(parts, "end")
    if not (reason and service and start and end and start < end):
        raise InvalidError(f"Step {step.stage} needs a slot, or (to book without a "
                           "published slot) a service, a start before its end, and a "
                           "reason")
    return Choice(OpenSlot("", service, start, end), reason)


def _published(repo: Repository, reference: str) -> OpenSlot:
    slot_id = local_id({"reference": reference}, "Slot")
    row = repo.conn.execute(select(schedule_slots).where(
        schedule_slots.c.slot_id == (slot_id or ""))).first() if slot_id else None
    if row is None:
        raise refused(f"{reference} is not a published Slot", "Parameters.parameter")
    return OpenSlot(row.slot_id, row.service or "", moment_of(row.start), moment_of(row.end),
                    row.capacity - row.booked)


def _check(ctx: Context, repo: Repository, enrolment: Enrolment, query: Query,
           chosen: list[OpenSlot]) -> None:
    found_in = _directory(ctx, repo, enrolment, query)
    problem = check_chain(query, found_in.routes, found_in.services, chosen, found_in.quotas)
    if problem is not None:
        raise refused(f"Not a chain this enrolment may book: {problem}", "Parameters.parameter")


# -- $hold-chain -----------------------------------------------------------------------------
def op_hold_chain(ctx: Context, request: FhirRequest, careplan_id: str) -> FhirResponse:
    if request.method != "POST":
        raise MethodNotAllowedError("$hold-chain is invoked with POST", headers={"Allow": "POST"})
    access.check_may_create(ctx.grant, "Appointment")
    args = arguments(request)
    minutes = number(args, "minutes", DEFAULT_HOLD, MAX_HOLD)
    hold_id = new_id()
    expires = now_micros() + minutes * 60_000_000
    with _offering_alternatives(ctx, careplan_id, args), ctx.writing() as repo:
        enrolment = enrolment_of(ctx, repo, careplan_id)
        given = choices(repo, args, enrolment.steps)
        if any(not c.slot.id for c in given):
            raise InvalidError("A step without a published slot is booked, not held")
        chosen = [c.slot for c in given]
        _check(ctx, repo, enrolment, _query(repo, enrolment, []), chosen)
        for slot in chosen:
            slot_store.take(repo, Claim(
                micros_of(slot.start), micros_of(slot.end), slot.id, enrolment.patient,
                careplan_id, enrolment.centre, hold_id=hold_id, expires=expires))
    return respond([{"name": "hold", "valueString": hold_id},
                        {"name": "expires", "valueInstant": format_instant(expires)},
                        *({"name": "slot", "valueReference": _reference(f"Slot/{s.id}")}
                          for s in chosen)])


def _held(repo: Repository, hold_id: str, careplan_id: str) -> list[OpenSlot]:
    rows = repo.conn.execute(select(schedule_claims).where(
        schedule_claims.c.hold_id == hold_id).order_by(schedule_claims.c.start)).all()
    if not rows or rows[0].careplan_id != careplan_id:
        raise refused(f"Hold {hold_id} is not a hold of CarePlan/{careplan_id}",
                      "Parameters.parameter")
    if rows[0].expires <= now_micros():
        slot_store.release_hold(repo, hold_id)
        raise refused(f"Hold {hold_id} has expired: find and hold the chain again",
                      "Parameters.parameter")
    slot_store.release_hold(repo, hold_id)  # its room passes to the appointments
    return [_published(repo, f"Slot/{row.slot_id}") for row in rows]


# -- $book-chain -----------------------------------------------------------------------------
def op_book_chain(ctx: Context, request: FhirRequest, careplan_id: str) -> FhirResponse:
    if request.method != "POST":
        raise MethodNotAllowedError("$book-chain is invoked with POST", headers={"Allow": "POST"})
    access.check_may_create(ctx.grant, "Appointment")
    args = arguments(request)
    hold_id = text(args, "hold")
    chain_id = new_id()
    with _offering_alternatives(ctx, careplan_id, args), ctx.writing() as repo:
        enrolment = enrolment_of(ctx, repo, careplan_id)
        given = ([Choice(slot) for slot in _held(repo, hold_id, careplan_id)]
                 if hold_id is not None else choices(repo, args, enrolment.steps))
        _check(ctx, repo, enrolment, _query(repo, enrolment, []), [c.slot for c in given])
        booked = []
        for step, chosen in zip(enrolment.steps, given, strict=True):
            appointment = repo.create(appointment_resource(ctx, enrolment, step, chosen,
                                                           chain_id))
            for claim in slot_store.claims_of(repo, appointment.resource(), enrolment.centre):
                slot_store.take(repo, claim)
            booked.append((step, appointment))
        task = _complete_booking_task(repo, enrolment, [a for _, a in booked])
    parameters: list[dict[str, Any]] = [
        {"name": "chain", "valueIdentifier": {"system": CHAIN_SYSTEM, "value": chain_id}}]
    parameters += [{"name": "appointment", "part": [
        {"name": "stage", "valueId": step.stage},
        {"name": "appointment", "valueReference": _reference(f"Appointment/{a.id}")},
        {"name": "start", "valueInstant": a.resource()["start"]}]} for step, a in booked]
    if task is not None:
        parameters.append({"name": "task", "valueReference": _reference(f"Task/{task}")})
    return respond(parameters)


def appointment_resource(ctx: Context, enrolment: Enrolment, step: ChainStep,
                         chosen: Choice, chain_id: str) -> dict[str, Any]:
    slot = chosen.slot
    stage = enrolment.protocol.stages.get(step.stage)
    participants: list[dict[str, Any]] = []
    if enrolment.patient:
        participants.append({"actor": {"reference": enrolment.patient}, "required": "required",
                             "status": "accepted"})
    participants.append({"actor": {"reference": slot.service}, "status": "accepted"})
    extensions: list[dict[str, Any]] = [{"url": CHAIN_STEP, "valueId": step.stage}]
    if chosen.reason is not None:
        extensions.append({"url": OVERRIDE, "extension": [
            {"url": "reason", "valueString": chosen.reason}, _overrider(ctx)]})
    appointment: dict[str, Any] = {
        "resourceType": "Appointment", "extension": extensions,
        "identifier": [{"system": CHAIN_SYSTEM, "value": chain_id}],
        "status": "booked", "serviceType": [{"coding": [
            {"system": "https://atm-gateway.org/fhir/CodeSystem/scheduling-service",
             "code": step.service}]}],
        "description": stage.title if stage is not None else step.stage,
        "start": format_instant(micros_of(slot.start)),
        "end": format_instant(micros_of(slot.end)),
        "created": format_instant(now_micros())[:10], "participant": participants}
    if slot.id:
        appointment["slot"] = [{"reference": f"Slot/{slot.id}"}]
    if enrolment.careplan is not None:
        appointment["supportingInformation"] = [{"reference":
                                                 f"CarePlan/{enrolment.careplan.id}"}]
    return appointment


def _overrider(ctx: Context) -> dict[str, Any]:
    """Who booked without a published slot: the calling client and its organisation."""
    if ctx.grant is None:
        return {"url": "by", "valueReference": {"display": ctx.actor.name or "server operator"}}
    client = ctx.grant.client
    return {"url": "by", "valueReference": {
        "reference": client.organization, "display": f"{client.name} ({client.client_id})"}}


def _complete_booking_task(repo: Repository, enrolment: Enrolment,
                           appointments: list[Version]) -> str | None:
    """The enrolment's booking Task is done once its chain is booked."""
    if enrolment.careplan is None:
        return None
    for task_id, _ in repo.referring("Task", "based-on", "CarePlan", [enrolment.careplan.id]):
        task = repo.read("Task", task_id)
        if task is None or task.deleted:
            continue
        resource = task.resource()
        key = task_run_key(resource)
        if key is None or key[1] != enrolment.booking_stage or resource.get("status") not in (
                "ready", "received", "accepted", "in-progress", "requested"):
            continue
        now = format_instant(now_micros())
        repo.update({**resource, "status": "completed", "lastModified": now,
                     "executionPeriod": {**resource.get("executionPeriod", {}), "end": now},
                     "output": [*resource.get("output", []), *(
                         {"type": {"text": BOOKED_INPUT},
                          "valueReference": {"reference": f"Appointment/{a.id}"}}
                         for a in appointments)]}, task_id)
        return task_id
    return None


# -- the appointments of a chain -----------------------------------------------------------
def chain_id_of(appointment: dict[str, Any]) -> str | None:
    return next((i.get("value") for i in appointment.get("identifier", [])
                 if i.get("system") == CHAIN_SYSTEM), None)


def stage_of(appointment: dict[str, Any]) -> str | None:
    return next((e.get("valueId") for e in appointment.get("extension", [])
                 if e.get("url") == CHAIN_STEP), None)


def chain_appointments(ctx: Context, repo: Repository, chain_id: str) -> dict[str, Version]:
    """The active appointments of a chain, by the stage each books."""
    ids = match_ids(internal(ctx), repo, "Appointment",
                    [("identifier", f"{CHAIN_SYSTEM}|{chain_id}")], limit=100)
    found: dict[str, Version] = {}
    for version in repo.read_many([("Appointment", i) for i in ids]).values():
        resource = version.resource()
        stage = stage_of(resource)
        if stage and resource.get("status") in slot_store.ACTIVE:
            found[stage] = version
    return found


def booked_slot(appointment: dict[str, Any]) -> OpenSlot:
    slot_id = next((i for ref in appointment.get("slot", []) if (i := local_id(ref, "Slot"))),
                   "")
    service = next((ref.get("actor", {}).get("reference") for ref in
                    appointment.get("participant", [])
                    if local_id(ref.get("actor"), "HealthcareService")), "")
    return OpenSlot(slot_id, service or "", _parse(appointment["start"]),
                    _parse(appointment["end"]))


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def booked_chain(ctx: Context, repo: Repository, careplan_id: str) -> dict[str, Version]:
    """The enrolment's latest booked chain, by stage."""
    ids = [i for i, _ in repo.referring("Appointment", "supporting-info", "CarePlan",
                                        [careplan_id])]
    chains = {chain for v in repo.read_many([("Appointment", i) for i in ids]).values()
              if v.resource().get("status") in slot_store.ACTIVE
              and (chain := chain_id_of(v.resource())) is not None}
    latest = max(chains, default=None)  # chain ids are time-ordered (UUIDv7)
    return chain_appointments(ctx, repo, latest) if latest else {}
