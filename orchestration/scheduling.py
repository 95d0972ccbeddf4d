"""Chain search: concrete slots, one per step of a chain, that a coordinator can book.

Pure: what is known about sites, routes, quotas and the patient comes in as values, and
the open slots through a `load` callback, so that a search reads only the weeks it needs.

The rules a chain satisfies:
- every step is booked at a service of ONE route (a site set: which apheresis sites feed
  which manufacturing sites and which treatment sites), routes tried by priority: the
  chains of priority 1 if there are any, else those of priority 2, and so on;
- each step starts within its lead time after the previous step's start (the lead may
  depend on the step's site, its country and the request's priority);
- the first step starts in the asked window, and any step in its own window if it has
  one (a reschedule or a delay pins steps or pushes them later);
- each slot has room left (capacity minus bookings and live holds), the manufacturer's
  quota for the period and the treatment centre is not used up, and no step overlaps
  another appointment of the patient or another step of the chain.

Ranking: the earliest last step (for CAR-T, the earliest infusion), then the earliest
first step. For each first-step slot the best chain from it is found by a depth-first
search that goes through later steps' slots in time order and prunes any branch that
cannot beat the best chain found so far; chains are distinct by the first step's day and
the sites used, so that five options are five real choices, not five half-hours of one
morning. The search stops as soon as no later first step could enter the ranking.

Slots are read as the search reaches them, per step a day, then 2, 4… days at a time: the
first step's in time order, each later step's as far as a scan needs, and no further than
the first steps being tried (a week of them, then 2, 4… weeks) can reach. A scan usually
stops at the first slot that can end a chain, hours into a lead window weeks wide: most of
that window is never read.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from orchestration.chains import ChainStep, Lead

NO_LEAD = Lead(timedelta(0), timedelta(0))
FIRST_CHUNK = timedelta(days=7)  # first steps are tried a week, then 2, 4… weeks at a time
FIRST_PAGE = timedelta(days=1)  # a step's slots are read a day, then 2, 4… days at a time
QUOTA = "quota"  # why a slot is refused: its service's quota is used up that day


@dataclass(frozen=True)
class Service:
    """A HealthcareService a step can be booked at, and where it is."""

    reference: str  # "HealthcareService/<id>"
    type: str  # a scheduling-service code
    location: str | None = None  # "Location/<id>"
    country: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class OpenSlot:
    """A published Slot with room left."""

    id: str
    service: str  # the HealthcareService reference of its Schedule
    start: datetime
    end: datetime
    free: int = 1


@dataclass(frozen=True)
class Route:
    """A site set: for each step (by stage id), the services it may be booked at."""

    priority: int
    services: Mapping[str, tuple[str, ...]]
    name: str | None = None


@dataclass(frozen=True)
class Quota:
    """At most `limit` bookings per `period` ("week", ISO weeks from Monday, or "month")
    at these services; `used` counts the bookings already made, by period start."""

    services: frozenset[str]
    period: str
    limit: int
    used: Mapping[date, int] = field(default_factory=dict)
    name: str | None = None

    def allows(self, service: str, start: datetime) -> bool:
        if service not in self.services:
            return True
        return self.used.get(period_start(self.period, start), 0) < self.limit


def period_start(period: str, moment: datetime) -> date:
    day = moment.date()
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown quota period {period!r}")


@dataclass(frozen=True)
class Query:
    """What is asked: the chain's steps, when the first step may start, the request's
    priority, how many chains, the patient's other appointments, and per-step windows."""

    steps: tuple[ChainStep, ...]
    earliest: datetime
    latest: datetime
    priority: str | None = None
    count: int = 5
    busy: tuple[tuple[datetime, datetime], ...] = ()
    windows: Mapping[str, tuple[datetime, datetime]] = field(default_factory=dict)
    pinned: Mapping[str, OpenSlot] = field(default_factory=dict)  # steps that stay put


@dataclass(frozen=True)
class Chain:
    """One bookable chain: a slot per step, in step order, from one route."""

    slots: tuple[OpenSlot, ...]
    route: Route

    @property
    def key(self) -> tuple[datetime, datetime]:
        return (self.slots[-1].start, self.slots[0].start)


@dataclass
class Found:
    chains: list[Chain]
    reasons: list[str]  # why there are none (empty when there are chains)


Loader = Callable[[tuple[str, ...], datetime, datetime], Sequence[OpenSlot]]
"""The open slots of these services starting in [start, end), sorted by start."""


def find_chains(query: Query, routes: Sequence[Route], services: Mapping[str, Service],
                load: Loader, quotas: Sequence[Quota] = ()) -> Found:
    """The best `query.count` chains of the first route priority that has any, or why
    there are none."""
    if not query.steps:
        return Found([], ["the chain has no steps"])
    usable = [r for r in routes
              if all(r.services.get(s.stage) or s.stage in query.pinned for s in query.steps)]
    if not usable:
        missing = sorted({s.service for s in query.steps})
        return Found([], [f"no route gives a site for every step ({', '.join(missing)})"])
    reasons: list[str] = []
    for priority in sorted({r.priority for r in usable}):
        level = [r for r in usable if r.priority == priority]
        search = _Search(query, level, services, load, quotas)
        chains = search.run()
        if chains:
            return Found(chains, [])
        reasons += [f"priority {priority}: {reason}" for reason in search.reasons()]
    return Found([], reasons)


def lead_at(query: Query, services: Mapping[str, Service], index: int, service: str) -> Lead:
    """Step `index`'s lead time when it is booked at `service`."""
    site = services.get(service)
    lead = query.steps[index].lead_for(site.country if site else None,
                                       site.location if site else None, query.priority)
    return lead or NO_LEAD


def check_chain(query: Query, routes: Sequence[Route], services: Mapping[str, Service],
                slots: Sequence[OpenSlot], quotas: Sequence[Quota] = ()) -> str | None:
    """Why these slots (one per step, in step order) are not a chain the query allows, or
    None when they are. A slot with an empty id is a booking without a published slot (an
    override): its site need not be on the route, and no quota counts it; the lead times
    and the patient's calendar still hold. Room in each slot is the booking's to check."""
    steps = query.steps
    if len(slots) != len(steps):
        return f"the chain has {len(steps)} steps; {len(slots)} were given"
    for step, slot in zip(steps, slots, strict=True):
        service = services.get(slot.service)
        if service is None or service.type != step.service:
            return (f"step {step.stage} needs a {step.service} service; "
                    f"{slot.service} is not one")
    if not any(all(not s.id or s.service in r.services.get(st.stage, ())
                   for st, s in zip(steps, slots, strict=True)) for r in routes):
        return "no route joins these sites"
    for index, (step, slot) in enumerate(zip(steps, slots, strict=True)):
        window = query.windows.get(step.stage)
        if window is not None and not window[0] <= slot.start < window[1]:
            return f"step {step.stage} must start from {window[0]:%Y-%m-%d %H:%M}"
        if index:
            lead, gap = lead_at(query, services, index, slot.service), slot.start - slots[
                index - 1].start
            if not lead.min <= gap <= lead.max:
                return (f"step {step.stage} starts {_days(gap)} after "
                        f"{steps[index - 1].stage}; its lead time is {_days(lead.min)} to "
                        f"{_days(lead.max)}")
        if slot.id and not all(q.allows(slot.service, slot.start) for q in quotas):
            return f"the quota of {slot.service} is used up for the period of step {step.stage}"
        taken = [*query.busy, *((s.start, s.end) for s in slots[:index])]
        if any(slot.start < end and start < slot.end for start, end in taken):
            return f"step {step.stage} overlaps another appointment of the patient"
    return None


class _Search:
    """The search at one route priority."""

    def __init__(self, query: Query, routes: list[Route], services: Mapping[str, Service],
                 load: Loader, quotas: Sequence[Quota]) -> None:
        self.query, self.routes, self.services = query, routes, services
        self.load, self.quotas = load, quotas
        steps = query.steps
        # Per step: the services any route offers, and the slots read so far per service.
        self.candidates = [tuple(sorted({x for r in routes for x in self.sites(i, r)}))
                           for i in range(len(steps))]
        self.slots: list[dict[str, list[OpenSlot]]] = [{} for _ in steps]
        self.starts: list[dict[str, list[datetime]]] = [{} for _ in steps]
        # How far after the first step each step can start, over every candidate site.
        self.reach: list[tuple[timedelta, timedelta]] = [(timedelta(0), timedelta(0))]
        for index in range(1, len(steps)):
            leads = [self.lead(index, x) for x in self.candidates[index]]
            low, high = self.reach[-1]
            self.reach.append((low + min(x.min for x in leads), high + max(x.max for x in leads)))
        # Per step: every slot starting before `read_until` has been read; the next page.
        self.read_until = [query.earliest + low for low, _ in self.reach]
        self.page = [FIRST_PAGE] * len(steps)
        self.until = query.earliest  # the first steps being tried start before this
        for index, step in enumerate(steps):
            pinned = query.pinned.get(step.stage)
            if pinned is not None:
                self.slots[index] = {pinned.service: [pinned]}
                self.starts[index] = {pinned.service: [pinned.start]}
        # What stopped chains, per step: no slot in reach, a quota, the patient's calendar.
        self.seen = [0] * len(steps)
        self.blocked_by_quota = [0] * len(steps)
        self.blocked_by_patient = [0] * len(steps)
        # Whether the quotas allow a booking at a service on a day, as found so far.
        self.allowed: dict[tuple[str, date], bool] = {}

    def lead(self, index: int, service: str) -> Lead:
        return lead_at(self.query, self.services, index, service)

    # -- reading slots as the search reaches them -------------------------------------
    def read(self, index: int, until: datetime) -> None:
        """Read step `index`'s slots from where its reading stopped to `until` (those of
        its window: no other can be booked)."""
        start, end = self.read_until[index], until
        window = self.query.windows.get(self.query.steps[index].stage)
        if window is not None:
            start, end = max(start, window[0]), min(end, window[1])
        if end > start:
            for slot in self.load(self.candidates[index], start, end):
                self.slots[index].setdefault(slot.service, []).append(slot)
                self.starts[index].setdefault(slot.service, []).append(slot.start)
        self.read_until[index] = max(self.read_until[index], until)

    def limit(self, index: int) -> datetime:
        """The end of step `index`'s reach: from the first steps being tried, or from an
        earlier pinned step, which a delay may have pushed beyond its own lead. No slot
        from there on is offered."""
        limit = self.until + self.reach[index][1]
        for earlier, step in enumerate(self.query.steps[:index]):
            pinned = self.query.pinned.get(step.stage)
            if pinned is not None:
                reach = self.reach[index][1] - self.reach[earlier][1]
                limit = max(limit, pinned.start + reach + timedelta(microseconds=1))
        return limit

    def read_page(self, index: int) -> None:
        self.read(index, min(self.read_until[index] + self.page[index], self.limit(index)))
        self.page[index] *= 2

    def slots_in(self, index: int, service: str, low: datetime, high: datetime,
                 found: list[tuple[OpenSlot, ...]]) -> Iterator[OpenSlot]:
        """Step `index`'s slots at `service` starting from `low` to `high` (and before its
        limit), in time order, as long as they could still beat the best chain found so
        far: read page by page as the caller goes on, and none once none could."""
        remaining = self.reach[-1][0] - self.reach[index][0]

        def beaten(start: datetime) -> bool:
            return bool(found) and start + remaining >= found[0][-1].start

        limit = self.limit(index)
        if low >= limit or beaten(low):
            return
        starts = self.starts[index].setdefault(service, [])
        slots = self.slots[index].setdefault(service, [])
        # Read past `low` first: whatever is read later starts after it.
        while self.read_until[index] <= low:
            self.read_page(index)
        position = bisect_left(starts, low)
        while True:
            if position == len(slots):
                end = self.read_until[index]  # every slot before it has been read
                if end > high or end >= limit or beaten(end):
                    return
                self.read_page(index)
                continue
            if starts[position] > high or starts[position] >= limit or beaten(starts[position]):
                return
            position += 1
            yield slots[position - 1]

    def run(self) -> list[Chain]:
        query = self.query
        best: dict[tuple[date, tuple[str, ...]], Chain] = {}
        chunk, start = FIRST_CHUNK, query.earliest
        done: set[str] = set()
        while start <= query.latest:
            until = min(start + chunk, query.latest + timedelta(microseconds=1))
            self.until = until
            for first in self.firsts(until, done):
                done.add(first.id)
                ranked = sorted(best.values(), key=lambda c: c.key)
                if (len(ranked) >= query.count
                        and first.start + self.reach[-1][0] >= ranked[query.count - 1].key[0]):
                    return ranked[:query.count]
                for route in self.routes:
                    chain = self.best_from(first, route)
                    if chain is None:
                        continue
                    key = (first.start.date(), tuple(s.service for s in chain.slots))
                    if key not in best or chain.key < best[key].key:
                        best[key] = chain
            start, chunk = until, chunk * 2
        return sorted(best.values(), key=lambda c: c.key)[:query.count]

    def firsts(self, until: datetime, done: set[str]) -> Iterator[OpenSlot]:
        """The first-step slots starting before `until` and not tried yet, in time order,
        read page by page as the caller goes on."""
        pinned = self.query.steps[0].stage in self.query.pinned
        while True:
            if not pinned:
                self.read(0, min(self.read_until[0] + self.page[0], until))
                self.page[0] *= 2
            yield from sorted((s for slots in self.slots[0].values() for s in slots
                               if s.id not in done and s.start < until), key=lambda s: s.start)
            if pinned or self.read_until[0] >= until:
                return

    # -- the depth-first search from one first-step slot ------------------------------
    def sites(self, index: int, route: Route) -> tuple[str, ...]:
        """Where step `index` may be booked on this route (a pinned step: where it is)."""
        pinned = self.query.pinned.get(self.query.steps[index].stage)
        return (pinned.service,) if pinned else route.services.get(
            self.query.steps[index].stage, ())

    def best_from(self, first: OpenSlot, route: Route) -> Chain | None:
        if first.service not in self.sites(0, route):
            return None
        if not self.bookable(0, first, ()):
            return None
        found: list[tuple[OpenSlot, ...]] = []
        self.extend((first,), route, found)
        return Chain(found[0], route) if found else None

    def extend(self, chain: tuple[OpenSlot, ...], route: Route,
               found: list[tuple[OpenSlot, ...]]) -> None:
        """Complete `chain` into `found[0]`, replacing it when a better one turns up."""
        index = len(chain)
        if index == len(self.query.steps):
            if not found or chain[-1].start < found[0][-1].start:
                found[:] = [chain]
            return
        previous = chain[-1]
        pinned = self.query.pinned.get(self.query.steps[index].stage)
        if pinned is not None:  # stays where it is (or where a delay has pushed it)
            self.extend((*chain, pinned), route, found)
            return
        for service in self.sites(index, route):
            lead = self.lead(index, service)
            used_up: date | None = None  # a day this site's quota is used up
            for slot in self.slots_in(index, service, previous.start + lead.min,
                                      previous.start + lead.max, found):
                if slot.start.date() == used_up:
                    continue  # nor can any other slot of that day be booked
                self.seen[index] += 1
                refusal = self.refusal(index, slot, chain)
                if refusal is None:
                    self.extend((*chain, slot), route, found)
                elif refusal == QUOTA:
                    used_up = slot.start.date()

    def bookable(self, index: int, slot: OpenSlot, chain: tuple[OpenSlot, ...]) -> bool:
        return self.refusal(index, slot, chain) is None

    def refusal(self, index: int, slot: OpenSlot, chain: tuple[OpenSlot, ...]) -> str | None:
        """Why the slot cannot be step `index` of this chain, or None when it can."""
        if self.query.steps[index].stage in self.query.pinned:
            return None  # booked already: its room and quota are its own
        window = self.query.windows.get(self.query.steps[index].stage)
        if window is not None and not window[0] <= slot.start < window[1]:
            return "window"
        if slot.free < 1:
            return "full"
        if not self.within_quotas(slot):
            self.blocked_by_quota[index] += 1
            return QUOTA
        taken = [*self.query.busy, *((s.start, s.end) for s in chain)]
        if any(slot.start < end and start < slot.end for start, end in taken):
            self.blocked_by_patient[index] += 1
            return "patient"
        return None

    def within_quotas(self, slot: OpenSlot) -> bool:
        """Every quota allows a booking at the slot's service on its day. Quotas count by
        week or month, whole days: the answer holds for every slot of that day, and is
        kept (a scan passes dozens of slots a day, each day for many first steps)."""
        key = (slot.service, slot.start.date())
        allowed = self.allowed.get(key)
        if allowed is None:
            allowed = self.allowed[key] = all(q.allows(slot.service, slot.start)
                                              for q in self.quotas)
        return allowed

    # -- why there are none -----------------------------------------------------------
    def reasons(self) -> list[str]:
        steps, query = self.query.steps, self.query
        if not any(self.slots[0].values()):
            return [f"no open {steps[0].service} slot between {query.earliest:%Y-%m-%d} "
                    f"and {query.latest:%Y-%m-%d}"]
        for index, step in enumerate(steps):
            if self.blocked_by_quota[index]:
                return [f"the {step.service} quota is used up for every period in reach"]
            if index and self.seen[index] == 0:
                lead = self.lead(index, self.candidates[index][0])
                return [f"no open {step.service} slot {_days(lead.min)} to {_days(lead.max)} "
                        f"after any {steps[index - 1].service} slot"]
            if self.blocked_by_patient[index]:
                return [f"every {step.service} slot in reach overlaps another appointment "
                        "of the patient"]
        return ["no slots satisfy every lead time together"]


def _days(delta: timedelta) -> str:
    if delta % timedelta(days=1) == timedelta(0):
        return f"{delta.days} d"
    return f"{delta.total_seconds() / 3600:g} h"
