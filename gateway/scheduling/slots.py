"""Slots and what claims them: the one place where a booking takes room in a slot.

Every write of a Slot is mirrored in `schedule_slots` (its service, time, capacity, how
many appointments it holds), which the chain search reads. Every write of an Appointment
reconciles its claims: an active Appointment claims each Slot it names, a cancelled one
gives them back. A claim locks its slot's row first (PostgreSQL: SELECT … FOR UPDATE;
SQLite: writers run one at a time), then counts bookings and live holds against the
capacity, so two coordinators racing for the last place cannot both get it, whichever
path they come by: $book-chain, a plain POST of an Appointment, or a transaction Bundle.

Capacity is the extension `slot-capacity` (a Slot may hold N bookings; 1 if absent).
The server keeps Slot.status in step with it: `busy` when full, `free` otherwise, unless
the site closed it (`busy-unavailable`, `entered-in-error`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update

from gateway.errors import BusinessRuleError, ConflictError, Issue
from gateway.services.context import Context
from gateway.store.repository import Repository, Version
from gateway.store.schema import schedule_claims, schedule_slots
from gateway.store.timeparse import micros_of, now_micros
from orchestration.state import role_assignments

ATM = "https://atm-gateway.org/fhir"
CAPACITY = f"{ATM}/StructureDefinition/slot-capacity"
MAX_CAPACITY = 10_000
CLOSED = ("busy-unavailable", "entered-in-error")
# Appointment statuses that hold their slots and the patient's time.
ACTIVE = ("pending", "booked", "arrived", "checked-in", "fulfilled")


def refused(message: str, expression: str) -> BusinessRuleError:
    return BusinessRuleError(message, issues=[Issue("business-rule", message,
                                                    expression=(expression,))])


def micros(value: Any, expression: str) -> int:
    """A FHIR instant as µs since the epoch (422 naming the element if it is not one)."""
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise refused(f"{expression} is not an instant", expression) from exc
    if moment.tzinfo is None:
        raise refused(f"{expression} needs a time zone", expression)
    return micros_of(moment)


def local_id(reference: Any, resource_type: str) -> str | None:
    """The id of a "Type/id" reference to a resource of this type, else None."""
    if not isinstance(reference, dict):
        return None
    parts = str(reference.get("reference") or "").split("/")
    return parts[1] if len(parts) == 2 and parts[0] == resource_type and parts[1] else None


# -- Slots -------------------------------------------------------------------------------
def capacity_of(slot: dict[str, Any]) -> int:
    extension = next((e for e in slot.get("extension", []) if e.get("url") == CAPACITY), None)
    if extension is None:
        return 1
    value = extension.get("valueUnsignedInt", extension.get("valuePositiveInt"))
    if not isinstance(value, int) or not 1 <= value <= MAX_CAPACITY:
        raise refused(f"slot-capacity must be a whole number from 1 to {MAX_CAPACITY}",
                      "Slot.extension")
    return value


def _service_of(repo: Repository, schedule_id: str) -> str | None:
    """The HealthcareService a Schedule serves (its first HealthcareService actor)."""
    schedule = repo.read("Schedule", schedule_id)
    if schedule is None or schedule.deleted:
        return None
    for actor in schedule.resource().get("actor", []):
        service_id = local_id(actor, "HealthcareService")
        if service_id:
            return f"HealthcareService/{service_id}"
    return None


def prepare_slot(ctx: Context, repo: Repository, current: Version | None,
                 slot: dict[str, Any]) -> None:
    """Write rule of Slot: a known Schedule, start before end, a sound capacity no lower
    than what is booked; the server sets free/busy from the bookings."""
    schedule_id = local_id(slot.get("schedule"), "Schedule")
    if schedule_id is None or repo.read("Schedule", schedule_id) is None:
        raise refused("Slot.schedule must name a Schedule of this server", "Slot.schedule")
    if micros(slot.get("start"), "Slot.start") >= micros(slot.get("end"), "Slot.end"):
        raise refused("Slot.start must be before Slot.end", "Slot.end")
    capacity = capacity_of(slot)
    booked = _booked(repo, current.id) if current is not None else 0
    if capacity < booked:
        raise ConflictError(f"Slot/{current.id if current else ''} holds {booked} "
                            f"appointments: its capacity cannot be {capacity}")
    if slot.get("status") not in CLOSED:
        slot["status"] = "busy" if booked >= capacity else "free"


def _booked(repo: Repository, slot_id: str) -> int:
    booked = repo.conn.execute(select(schedule_slots.c.booked)
                               .where(schedule_slots.c.slot_id == slot_id)).scalar()
    return int(booked or 0)


def project_slot(ctx: Context, repo: Repository, version: Version) -> None:
    """After a Slot write: its row in schedule_slots, as the search reads it."""
    slot = version.resource()
    values = {"schedule_id": local_id(slot.get("schedule"), "Schedule") or "",
              "service": _service_of(repo, local_id(slot.get("schedule"), "Schedule") or ""),
              "start": micros(slot["start"], "Slot.start"),
              "end": micros(slot["end"], "Slot.end"),
              "capacity": capacity_of(slot), "open": slot.get("status") not in CLOSED}
    changed = repo.conn.execute(update(schedule_slots).where(
        schedule_slots.c.slot_id == version.id).values(**values)).rowcount
    if not changed:
        repo.conn.execute(insert(schedule_slots).values(slot_id=version.id, booked=0, **values))


def project_schedule(ctx: Context, repo: Repository, version: Version) -> None:
    """After a Schedule write: its slots serve what it now serves."""
    repo.conn.execute(update(schedule_slots)
                      .where(schedule_slots.c.schedule_id == version.id)
                      .values(service=_service_of(repo, version.id)))


def before_slot_delete(ctx: Context, repo: Repository, slot_id: str) -> None:
    if _booked(repo, slot_id):
        raise ConflictError(f"Slot/{slot_id} holds appointments: cancel or move them first")
    repo.conn.execute(delete(schedule_slots).where(schedule_slots.c.slot_id == slot_id))


# -- claims ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """What one appointment or hold takes of a slot (or, without a slot, of the patient's
    time)."""

    start: int
    end: int
    slot_id: str | None = None
    patient: str | None = None
    careplan_id: str | None = None
    organization: str | None = None
    appointment_id: str | None = None
    hold_id: str | None = None
    expires: int | None = None


def _lock(repo: Repository, slot_id: str) -> Any:
    """The slot's row, locked until the transaction ends."""
    query = select(schedule_slots).where(schedule_slots.c.slot_id == slot_id)
    if repo.conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return repo.conn.execute(query).first()


def live_holds(repo: Repository, slot_id: str, now: int) -> int:
    return int(repo.conn.execute(select(func.count()).where(
        schedule_claims.c.slot_id == slot_id, schedule_claims.c.hold_id.is_not(None),
        schedule_claims.c.expires > now)).scalar() or 0)


class SlotTakenError(ConflictError):
    """The slot has no room left (or is closed): the caller may offer alternatives."""

    def __init__(self, slot_id: str, why: str) -> None:
        super().__init__(f"Slot/{slot_id} {why}")
        self.slot_id = slot_id


def take(repo: Repository, claim: Claim) -> None:
    """Claim room in a slot (an appointment or a hold), or only the patient's time when
    the claim has no slot. 409 when the slot is full or closed, or the patient is busy."""
    service = None
    if claim.slot_id is not None:
        row = _lock(repo, claim.slot_id)
        if row is None:
            raise refused(f"Slot/{claim.slot_id} is not a published slot", "Appointment.slot")
        if not row.open:
            raise SlotTakenError(claim.slot_id, "is closed")
        if row.booked + live_holds(repo, claim.slot_id, now_micros()) >= row.capacity:
            raise SlotTakenError(claim.slot_id, f"is full ({row.capacity} of {row.capacity} "
                                                "places taken)")
        service = row.service
        if claim.appointment_id is not None:
            repo.conn.execute(update(schedule_slots).where(
                schedule_slots.c.slot_id == claim.slot_id).values(
                booked=schedule_slots.c.booked + 1))
            _sync_status(repo, claim.slot_id, row.booked + 1, row.capacity)
    if claim.patient is not None:
        _check_patient_free(repo, claim)
    repo.conn.execute(insert(schedule_claims).values(
        slot_id=claim.slot_id, service=service, appointment_id=claim.appointment_id,
        hold_id=claim.hold_id, careplan_id=claim.careplan_id, patient=claim.patient,
        organization=claim.organization, start=claim.start, end=claim.end,
        expires=claim.expires))


def _check_patient_free(repo: Repository, claim: Claim) -> None:
    """No patient is in two places at once: an overlapping appointment, or another
    enrolment's live hold, is a conflict."""
    other = repo.conn.execute(select(schedule_claims.c.appointment_id).where(
        schedule_claims.c.patient == claim.patient,
        schedule_claims.c.start < claim.end, schedule_claims.c.end > claim.start,
        or_(schedule_claims.c.appointment_id.is_not(None),
            and_(schedule_claims.c.expires > now_micros(),
                 schedule_claims.c.careplan_id != (claim.careplan_id or ""))),
        or_(schedule_claims.c.appointment_id.is_(None),
            schedule_claims.c.appointment_id != (claim.appointment_id or "")),
    ).limit(1)).first()
    if other is not None:
        what = f"Appointment/{other[0]}" if other[0] else "a held chain"
        raise ConflictError(f"{claim.patient} already has {what} at that time")


def release_appointment(repo: Repository, appointment_id: str) -> None:
    """Give back every slot an appointment claimed."""
    claims = repo.conn.execute(select(schedule_claims.c.slot_id).where(
        schedule_claims.c.appointment_id == appointment_id)).all()
    repo.conn.execute(delete(schedule_claims).where(
        schedule_claims.c.appointment_id == appointment_id))
    for (slot_id,) in claims:
        if slot_id is None:
            continue
        row = _lock(repo, slot_id)
        if row is not None:
            booked = max(0, row.booked - 1)
            repo.conn.execute(update(schedule_slots).where(
                schedule_slots.c.slot_id == slot_id).values(booked=booked))
            _sync_status(repo, slot_id, booked, row.capacity)


def release_hold(repo: Repository, hold_id: str) -> int:
    return int(repo.conn.execute(delete(schedule_claims).where(
        schedule_claims.c.hold_id == hold_id)).rowcount)


def _sync_status(repo: Repository, slot_id: str, booked: int, capacity: int) -> None:
    """A new Slot version when it fills up or frees again (a closed slot stays closed)."""
    current = repo.read("Slot", slot_id)
    if current is None or current.deleted:
        return
    slot = current.resource()
    status = "busy" if booked >= capacity else "free"
    if slot.get("status") in CLOSED or slot.get("status") == status:
        return
    repo.update({**slot, "status": status}, slot_id)


# -- Appointments ------------------------------------------------------------------------
def patient_of(appointment: dict[str, Any]) -> str | None:
    for participant in appointment.get("participant", []):
        patient_id = local_id(participant.get("actor"), "Patient")
        if patient_id:
            return f"Patient/{patient_id}"
    return None


def careplan_of(appointment: dict[str, Any]) -> str | None:
    return next((i for ref in appointment.get("supportingInformation", [])
                 if (i := local_id(ref, "CarePlan"))), None)


def claims_of(repo: Repository, appointment: dict[str, Any],
              organization: str | None = None) -> list[Claim]:
    """What an active Appointment claims: each slot it names, or its own time."""
    if appointment.get("status") not in ACTIVE:
        return []
    slot_ids = [i for ref in appointment.get("slot", []) if (i := local_id(ref, "Slot"))]
    if len(slot_ids) < len(appointment.get("slot", [])):
        raise refused("Appointment.slot must name Slots of this server", "Appointment.slot")
    common: dict[str, Any] = {
        "patient": patient_of(appointment), "careplan_id": careplan_of(appointment),
        "organization": organization, "appointment_id": appointment.get("id")}
    if slot_ids:
        claims = []
        for slot_id in slot_ids:
            row = repo.conn.execute(select(schedule_slots.c.start, schedule_slots.c.end).where(
                schedule_slots.c.slot_id == slot_id)).first()
            if row is None:
                raise refused(f"Slot/{slot_id} is not a published slot", "Appointment.slot")
            claims.append(Claim(start=row.start, end=row.end, slot_id=slot_id, **common))
        return claims
    if appointment.get("start") and appointment.get("end") and common["patient"]:
        return [Claim(start=micros(appointment["start"], "Appointment.start"),
                      end=micros(appointment["end"], "Appointment.end"), **common)]
    return []


def reconcile_appointment(ctx: Context, repo: Repository, version: Version) -> None:
    """After an Appointment write: it claims exactly what its new version names."""
    appointment = version.resource()
    organization = repo.conn.execute(select(schedule_claims.c.organization).where(
        schedule_claims.c.appointment_id == version.id).limit(1)).scalar()
    release_appointment(repo, version.id)
    for claim in claims_of(repo, appointment, organization or _centre(repo, appointment)):
        take(repo, claim)


def _centre(repo: Repository, appointment: dict[str, Any]) -> str | None:
    """The treatment centre an enrolment's appointment counts against (quotas)."""
    careplan_id = careplan_of(appointment)
    careplan = repo.read("CarePlan", careplan_id) if careplan_id else None
    if careplan is None or careplan.deleted:
        return None
    return treatment_centre(careplan.resource())


def treatment_centre(careplan: dict[str, Any]) -> str | None:
    """The organisation whose patient this is: the enrolment's treatment centre or
    coordinator, else the plan's author."""
    assigned = role_assignments(careplan)
    return (assigned.get("treatment-centre") or assigned.get("coordinator")
            or careplan.get("author", {}).get("reference"))


def before_appointment_delete(ctx: Context, repo: Repository, appointment_id: str) -> None:
    release_appointment(repo, appointment_id)
