"""What the chain search needs to know, read from the store: the services each step may
be booked at (HealthcareService, with its Location and country), the routes between
sites (OrganizationAffiliation), the manufacturers' quotas, the patient's other
appointments, and the open slots of a window.

Routes are data: an OrganizationAffiliation with code `chain-route` lists the services of
one site set (say, apheresis at A, manufacturing at M, infusion at T) for the treatment
centre in its `organization` (for every centre when it has none), with the priority in
the extension `route-priority` (1 first). With no route at all, every service of the
right type may serve each step (one implicit route of priority 1).

A quota is an extension `booking-quota` on a HealthcareService: at most `limit` bookings
per `period` (week or month), for the treatment centre in `organization`, or for all of
them together when it has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select

from gateway.scheduling.slots import ATM, local_id, refused
from gateway.services.context import Context
from gateway.services.search import match_ids
from gateway.store.repository import Repository
from gateway.store.schema import schedule_claims, schedule_slots
from gateway.store.timeparse import micros_of, moment_of, now_micros
from orchestration.chains import SERVICE_SYSTEM, ChainStep
from orchestration.scheduling import OpenSlot, Quota, Route, Service, period_start

ROUTE_SYSTEM = f"{ATM}/CodeSystem/scheduling-route"
ROUTE_CODE = "chain-route"
ROUTE_PRIORITY = f"{ATM}/StructureDefinition/route-priority"
QUOTA = f"{ATM}/StructureDefinition/booking-quota"
QUOTA_PERIODS = ("week", "month")
MAX_LISTED = 1000  # services or routes one search reads


@dataclass
class Directory:
    services: dict[str, Service]
    routes: list[Route]
    quotas: list[Quota]


def internal(ctx: Context) -> Context:
    """Sites and routes are read whole: what a caller may book is not what it may see."""
    return replace(ctx, grant=None)


def _service_type(service: dict[str, Any]) -> str | None:
    for concept in service.get("type", []):
        for coding in concept.get("coding", []):
            if coding.get("system") == SERVICE_SYSTEM and coding.get("code"):
                return str(coding["code"])
    return None


def _services(ctx: Context, repo: Repository, codes: set[str]) -> dict[str, Service]:
    ids: list[str] = []
    for code in sorted(codes):
        ids += match_ids(internal(ctx), repo, "HealthcareService",
                         [("service-type", f"{SERVICE_SYSTEM}|{code}")], limit=MAX_LISTED)
    found = repo.read_many([("HealthcareService", i) for i in ids])
    locations = repo.read_many([("Location", i) for v in found.values()
                                for ref in v.resource().get("location", [])[:1]
                                if (i := local_id(ref, "Location"))])
    services: dict[str, Service] = {}
    for version in found.values():
        resource = version.resource()
        if resource.get("active") is False:
            continue
        location_id = next((local_id(ref, "Location") for ref in resource.get("location", [])),
                           None)
        location = locations.get(("Location", location_id or ""))
        country = (location.resource().get("address", {}).get("country")
                   if location is not None else None)
        reference = f"HealthcareService/{version.id}"
        services[reference] = Service(
            reference, _service_type(resource) or "",
            f"Location/{location_id}" if location_id else None,
            country.upper() if isinstance(country, str) else None, resource.get("name"))
    return services


def _routes(ctx: Context, repo: Repository, steps: Sequence[ChainStep],
            services: dict[str, Service], centre: str | None) -> list[Route]:
    ids = match_ids(internal(ctx), repo, "OrganizationAffiliation",
                    [("role", f"{ROUTE_SYSTEM}|{ROUTE_CODE}")], limit=MAX_LISTED)
    routes = []
    for version in repo.read_many([("OrganizationAffiliation", i) for i in ids]).values():
        affiliation = version.resource()
        owner = affiliation.get("organization", {}).get("reference")
        if affiliation.get("active") is False or (owner is not None and owner != centre):
            continue
        listed = [f"HealthcareService/{i}" for ref in affiliation.get("healthcareService", [])
                  if (i := local_id(ref, "HealthcareService"))]
        priority = next((e.get("valueUnsignedInt", e.get("valuePositiveInt"))
                         for e in affiliation.get("extension", [])
                         if e.get("url") == ROUTE_PRIORITY), 1)
        routes.append(Route(int(priority) if isinstance(priority, int) else 1, {
            step.stage: tuple(s for s in listed if s in services
                              and services[s].type == step.service) for step in steps},
            f"OrganizationAffiliation/{version.id}"))
    if routes:
        return routes
    return [Route(1, {step.stage: tuple(sorted(s for s, v in services.items()
                                               if v.type == step.service)) for step in steps})]


def _quotas(ctx: Context, repo: Repository, services: dict[str, Service], centre: str | None,
            around: tuple[datetime, datetime]) -> list[Quota]:
    found = repo.read_many([("HealthcareService", s.split("/")[1]) for s in services])
    quotas = []
    for version in found.values():
        reference = f"HealthcareService/{version.id}"
        for period, limit, owner in quota_terms(version.resource()):
            if owner is not None and owner != centre:
                continue
            quotas.append(Quota(frozenset({reference}), period, limit,
                                _used(repo, reference, period, owner, around),
                                f"{version.resource().get('name') or reference}: {limit} "
                                f"per {period}" + (f" for {owner}" if owner else "")))
    return quotas


def quota_terms(service: dict[str, Any]) -> list[tuple[str, int, str | None]]:
    """(period, limit, treatment centre or None) of each booking-quota a service carries
    (a malformed one is refused on write by check_quotas, so never stored)."""
    found = []
    for extension in service.get("extension", []):
        if extension.get("url") != QUOTA:
            continue
        parts = {e.get("url"): e for e in extension.get("extension", [])}
        period = parts.get("period", {}).get("valueCode")
        limit = parts.get("limit", {}).get("valueUnsignedInt")
        owner = parts.get("organization", {}).get("valueReference", {}).get("reference")
        if period in QUOTA_PERIODS and isinstance(limit, int):
            found.append((period, limit, owner))
    return found


def _used(repo: Repository, service: str, period: str, owner: str | None,
          around: tuple[datetime, datetime]) -> dict[Any, int]:
    """Bookings already made at a service, per period (for one centre, or all)."""
    low = micros_of(around[0] - timedelta(days=31))
    high = micros_of(around[1] + timedelta(days=31))
    query = select(schedule_claims.c.start).where(
        schedule_claims.c.service == service, schedule_claims.c.appointment_id.is_not(None),
        schedule_claims.c.start >= low, schedule_claims.c.start < high)
    if owner is not None:
        query = query.where(schedule_claims.c.organization == owner)
    used: dict[Any, int] = {}
    for (start,) in repo.conn.execute(query):
        key = period_start(period, moment_of(start))
        used[key] = used.get(key, 0) + 1
    return used


def directory(ctx: Context, repo: Repository, steps: Sequence[ChainStep], centre: str | None,
              around: tuple[datetime, datetime]) -> Directory:
    services = _services(ctx, repo, {step.service for step in steps})
    return Directory(services, _routes(ctx, repo, steps, services, centre),
                     _quotas(ctx, repo, services, centre, around))


# -- the patient's time and the open slots -----------------------------------------------
def patient_busy(repo: Repository, patient: str | None, careplan_id: str | None,
                 around: tuple[datetime, datetime],
                 ignore: Sequence[str] = ()) -> tuple[tuple[datetime, datetime], ...]:
    """The patient's appointments (and other enrolments' live holds) near the window,
    leaving out the appointments in `ignore` (those being moved)."""
    if patient is None:
        return ()
    rows = repo.conn.execute(select(schedule_claims.c.start, schedule_claims.c.end).where(
        schedule_claims.c.patient == patient,
        schedule_claims.c.end > micros_of(around[0]),
        schedule_claims.c.start < micros_of(around[1]),
        or_(and_(schedule_claims.c.appointment_id.is_not(None),
                 schedule_claims.c.appointment_id.not_in(list(ignore) or [""])),
            and_(schedule_claims.c.expires > now_micros(),
                 schedule_claims.c.careplan_id != (careplan_id or "")))))
    return tuple((moment_of(start), moment_of(end)) for start, end in rows)


class SlotLoader:
    """The search's `load`: open slots of some services in a window, with the room left
    once bookings and live holds are counted."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.now = now_micros()

    def __call__(self, services: tuple[str, ...], start: datetime,
                 end: datetime) -> list[OpenSlot]:
        if not services:
            return []
        low, high = micros_of(start), micros_of(end)
        slots = schedule_slots.c
        rows = self.repo.conn.execute(
            select(slots.slot_id, slots.service, slots.start, slots.end,
                   slots.capacity - slots.booked)
            .where(slots.service.in_(services), slots.start >= low, slots.start < high,
                   slots.open.is_(True), slots.booked < slots.capacity)
            .order_by(slots.start, slots.slot_id)).all()
        held: dict[str, int] = dict(self.repo.conn.execute(
            select(schedule_claims.c.slot_id, func.count())
            .where(schedule_claims.c.service.in_(services), schedule_claims.c.start >= low,
                   schedule_claims.c.start < high, schedule_claims.c.expires > self.now)
            .group_by(schedule_claims.c.slot_id)).all())
        return [OpenSlot(slot_id, service, moment_of(begin),
                         moment_of(finish), free - held.get(slot_id, 0))
                for slot_id, service, begin, finish, free in rows
                if free - held.get(slot_id, 0) > 0]


def check_quotas(ctx: Context, repo: Repository, current: Any,
                 service: dict[str, Any]) -> None:
    """Write rule of HealthcareService: each booking-quota has a period (week or month), a
    limit, and at most one treatment centre."""
    for index, extension in enumerate(service.get("extension", [])):
        if extension.get("url") != QUOTA:
            continue
        where = f"HealthcareService.extension[{index}]"
        parts = extension.get("extension", [])
        urls = [p.get("url") for p in parts]
        known = {"period", "limit", "organization"}
        period = next((p.get("valueCode") for p in parts if p.get("url") == "period"), None)
        limit = next((p.get("valueUnsignedInt") for p in parts if p.get("url") == "limit"), None)
        if (period not in QUOTA_PERIODS or not isinstance(limit, int)
                or any(urls.count(u) > 1 for u in known) or set(urls) - known):
            raise refused("booking-quota needs one period (week or month), one limit "
                          "(valueUnsignedInt) and at most one organization", where)
