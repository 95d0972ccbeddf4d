"""The slot and quota use panel: per site and kind of service, how full its slots are
over a range of days (from the schedule_slots and schedule_claims projections) and how
much of each booking quota is used."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import orjson
from sqlalchemy import Connection, case, func, literal_column, select

from gateway.dashboard.health.scope import Viewer, day_span, unrestricted
from gateway.scheduling.directory import quota_terms
from gateway.scheduling.slots import local_id
from gateway.store.database import Database
from gateway.store.repository import Repository
from gateway.store.schema import resources, schedule_claims, schedule_slots, sp_token
from gateway.store.timeparse import now_micros
from orchestration.chains import SERVICE_SYSTEM
from orchestration.scheduling import period_start

R = resources
DAY_MICROS = 86_400_000_000
KIND_ORDER = ("apheresis", "manufacturing", "infusion")  # a journey's order, others after


@dataclass(frozen=True)
class QuotaUse:
    """One booking-quota over one of its periods: how much of it is used."""

    service: str  # HealthcareService/<id>
    service_name: str | None
    period: str  # week | month
    period_start: date
    limit: int
    used: int  # appointments booked at the service in the period (for the centre, if any)
    organization: str | None  # the treatment centre it is allocated to; None: shared

    @property
    def full(self) -> bool:
        return self.used >= self.limit


@dataclass(frozen=True)
class SiteUse:
    """One site's service of one kind over the range: its slots, how full they are, and
    its quotas. Closed slots offer no room: they count in `closed`, and what they still
    hold counts in `booked` and `capacity` alike."""

    organization: str | None  # Organization/<id> (HealthcareService.providedBy)
    name: str  # the Organization's name, else the service's
    kind: str  # apheresis | manufacturing | infusion | …
    services: tuple[str, ...]  # HealthcareService/<id>
    slots: int  # open slots starting in the range
    closed: int
    capacity: int  # places
    booked: int  # places taken by appointments
    held: int  # places held by live $hold-chain holds
    utilisation: float | None  # booked / capacity, in percent (None: no capacity)
    quotas: tuple[QuotaUse, ...]


@dataclass(frozen=True)
class _Service:
    reference: str
    kind: str
    organization: str | None
    name: str | None
    active: bool
    quotas: tuple[tuple[str, int, str | None], ...]  # (period, limit, organization)


def slot_use(db: Database, viewer: Viewer, since: date, until: date) -> list[SiteUse]:
    """Capacity, bookings and quota use of every scheduling service, per site and kind,
    for slots starting from `since` to `until` (UTC days). Everyone who reads the
    directory sees every site; a quota allocated to a treatment centre only that centre
    (and unrestricted roles) sees."""
    low, high = day_span(since, until)
    with db.read() as conn:
        services = _scheduling_services(conn)
        totals = _slot_totals(conn, list(services), low, high)
        held = _held(conn, list(services), low, high)
        listed = [s for s in services.values() if s.active or s.reference in totals]
        names = _organization_names(conn, {s.organization for s in listed if s.organization})
        quotas = _quota_use(conn, viewer, listed, since, until)
    return _by_site(listed, totals, held, names, quotas)


def _scheduling_services(conn: Connection) -> dict[str, _Service]:
    """Every HealthcareService typed with a scheduling-service code (a directory's worth:
    their bodies are read)."""
    typed = (select(sp_token.c.res_id).where(
        sp_token.c.res_type == "HealthcareService", sp_token.c.param == "service-type",
        sp_token.c.system == SERVICE_SYSTEM))
    rows = conn.execute(select(R.c.res_id, R.c.content).where(
        R.c.res_type == "HealthcareService", R.c.deleted.is_(False), R.c.res_id.in_(typed)))
    services = {}
    for row in rows:
        service = orjson.loads(row.content)
        kind = next((c["code"] for concept in service.get("type", [])
                     for c in concept.get("coding", [])
                     if c.get("system") == SERVICE_SYSTEM and c.get("code")), None)
        if kind is None:
            continue
        owner = local_id(service.get("providedBy"), "Organization")
        reference = f"HealthcareService/{row.res_id}"
        services[reference] = _Service(reference, kind, f"Organization/{owner}" if owner else None,
                                       service.get("name"), service.get("active") is not False,
                                       tuple(quota_terms(service)))
    return services


def _slot_totals(conn: Connection, services: list[str], low: int,
                 high: int) -> dict[str, tuple[int, int, int, int]]:
    """Per service: (open slots, closed slots, places, booked) of slots starting in
    [low, high), summed in the database from the schedule_slots projection."""
    if not services:
        return {}
    s = schedule_slots.c
    is_open = s.open.is_(True)
    rows = conn.execute(
        select(s.service, func.sum(case((is_open, 1), else_=0)),
               func.sum(case((is_open, 0), else_=1)),
               func.sum(case((is_open, s.capacity), else_=s.booked)), func.sum(s.booked))
        .where(s.service.in_(services), s.start >= low, s.start < high)
        .group_by(s.service))
    return {service: (int(n), int(closed), int(places), int(booked))
            for service, n, closed, places, booked in rows}


def _held(conn: Connection, services: list[str], low: int, high: int) -> dict[str, int]:
    """Per service: places held by live holds on slots starting in [low, high)."""
    if not services:
        return {}
    c = schedule_claims.c
    rows = conn.execute(select(c.service, func.count()).where(
        c.service.in_(services), c.start >= low, c.start < high,
        c.hold_id.is_not(None), c.expires > now_micros()).group_by(c.service))
    return {service: int(count) for service, count in rows}


def _organization_names(conn: Connection, organizations: set[str]) -> dict[str, str]:
    found = Repository(conn).read_many([("Organization", o.split("/")[1])
                                        for o in organizations])
    return {f"Organization/{i}": str(v.resource().get("name") or f"Organization/{i}")
            for (_, i), v in found.items()}


def _quota_use(conn: Connection, viewer: Viewer, services: list[_Service], since: date,
               until: date) -> dict[str, list[QuotaUse]]:
    """Per service: each quota the viewer may see, once per period the range touches,
    with the appointments booked in it (as the chain search counts them)."""
    shown = [(s, q) for s in services for q in s.quotas
             if q[2] in (None, viewer.organization) or unrestricted(viewer)]
    if not shown:
        return {}
    spans = {period: _periods(period, since, until) for _, (period, _, _) in shown}
    days = _bookings_per_day(conn, {s.reference for s, _ in shown},
                             min(p[0][0] for p in spans.values()),
                             max(p[-1][1] for p in spans.values()))
    lines: dict[str, list[QuotaUse]] = {}
    for service, (period, limit, owner) in shown:
        for start, end in spans[period]:
            used = sum(n for (ref, centre, day), n in days.items()
                       if ref == service.reference and start <= day < end
                       and owner in (None, centre))
            lines.setdefault(service.reference, []).append(QuotaUse(
                service.reference, service.name, period, start, limit, used, owner))
    return lines


def _periods(period: str, since: date, until: date) -> list[tuple[date, date]]:
    """[start, end) of each week (from Monday) or month that the days since..until touch."""
    start = period_start(period, datetime.combine(since, time(), UTC))
    spans = []
    while start <= until:
        end = start + timedelta(days=7) if period == "week" else \
            (start.replace(day=28) + timedelta(days=4)).replace(day=1)
        spans.append((start, end))
        start = end
    return spans


def _bookings_per_day(conn: Connection, services: set[str], first: date,
                      end: date) -> dict[tuple[str, str | None, date], int]:
    """(service, treatment centre, day) -> appointments starting that day in
    [first, end), counted in the database (claims of appointments, not holds: what quotas
    count)."""
    c = schedule_claims.c
    low, high = day_span(first, end - timedelta(days=1))
    day = c.start // literal_column(str(DAY_MICROS))  # the same text in SELECT and GROUP BY
    rows = conn.execute(select(c.service, c.organization, day, func.count()).where(
        c.service.in_(services), c.start >= low, c.start < high,
        c.appointment_id.is_not(None)).group_by(c.service, c.organization, day))
    epoch = date(1970, 1, 1)
    return {(service, centre, epoch + timedelta(days=int(n))): int(count)
            for service, centre, n, count in rows}


def _by_site(services: list[_Service], totals: dict[str, tuple[int, int, int, int]],
             held: dict[str, int], names: dict[str, str],
             quotas: dict[str, list[QuotaUse]]) -> list[SiteUse]:
    """The services summed per (organisation, kind), in a journey's order of kinds."""
    groups: dict[tuple[str | None, str], list[_Service]] = {}
    for service in services:
        groups.setdefault((service.organization, service.kind), []).append(service)
    sites = []
    for (organization, kind), members in groups.items():
        refs = tuple(sorted(s.reference for s in members))
        n, closed, places, booked = (sum(totals.get(r, (0, 0, 0, 0))[i] for r in refs)
                                     for i in range(4))
        name = names.get(organization or "") or members[0].name or organization or refs[0]
        sites.append(SiteUse(
            organization, name, kind, refs, n, closed, places, booked,
            sum(held.get(r, 0) for r in refs),
            round(100 * booked / places, 1) if places else None,
            tuple(q for r in refs for q in quotas.get(r, []))))
    order = {kind: i for i, kind in enumerate(KIND_ORDER)}
    return sorted(sites, key=lambda s: (order.get(s.kind, len(order)), s.kind, s.name))

