"""The pure chain search: lead times, routes and their priorities, room, quotas, windows,
the patient's calendar, ranking, and why there is no chain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from orchestration.chains import ChainStep, Lead, LeadRule
from orchestration.scheduling import (
    OpenSlot,
    Query,
    Quota,
    Route,
    Service,
    check_chain,
    find_chains,
    period_start,
)

DAY = timedelta(days=1)
T0 = datetime(2027, 1, 4, tzinfo=UTC)  # a Monday
STEPS = (ChainStep("apheresis", "apheresis"),
         ChainStep("manufacturing", "manufacturing", Lead(2 * DAY, 5 * DAY),
                   (LeadRule(Lead(1 * DAY, 2 * DAY), priority="urgent"),)),
         ChainStep("infusion", "infusion", Lead(28 * DAY, 35 * DAY),
                   (LeadRule(Lead(30 * DAY, 35 * DAY), country="DE"),)))
SERVICES = {f"HealthcareService/{name}": Service(f"HealthcareService/{name}", kind,
                                                 f"Location/{name}", country)
            for name, kind, country in [("aph-a", "apheresis", "FR"), ("aph-b", "apheresis", "FR"),
                                        ("mfg", "manufacturing", "NL"),
                                        ("inf-a", "infusion", "FR"), ("inf-b", "infusion", "DE")]}
EVERY = Route(1, {"apheresis": ("HealthcareService/aph-a", "HealthcareService/aph-b"),
                  "manufacturing": ("HealthcareService/mfg",),
                  "infusion": ("HealthcareService/inf-a", "HealthcareService/inf-b")})


def daily(service: str, first: int, last: int, hour: int = 9, free: int = 1) -> list[OpenSlot]:
    return [OpenSlot(f"{service.split('/')[1]}-{day}", service, T0 + day * DAY + hour * timedelta(
        hours=1), T0 + day * DAY + (hour + 4) * timedelta(hours=1), free)
        for day in range(first, last + 1)]


class Store:
    """Open slots; records every window the search reads."""

    def __init__(self, slots: Sequence[OpenSlot]) -> None:
        self.slots = sorted(slots, key=lambda s: s.start)
        self.reads: list[tuple[datetime, datetime]] = []

    def __call__(self, services: tuple[str, ...], start: datetime,
                 end: datetime) -> list[OpenSlot]:
        self.reads.append((start, end))
        return [s for s in self.slots if s.service in services and start <= s.start < end]


def network(**changes: list[OpenSlot]) -> Store:
    slots = {"aph-a": daily("HealthcareService/aph-a", 0, 30),
             "aph-b": daily("HealthcareService/aph-b", 0, 30),
             "mfg": daily("HealthcareService/mfg", 0, 40),
             "inf-a": daily("HealthcareService/inf-a", 0, 90),
             "inf-b": daily("HealthcareService/inf-b", 0, 90), **changes}
    return Store([s for group in slots.values() for s in group])


def query(**changes: object) -> Query:
    fields: dict[str, object] = {"steps": STEPS, "earliest": T0, "latest": T0 + 60 * DAY}
    fields.update(changes)
    return Query(**fields)  # type: ignore[arg-type]


def test_chains_keep_every_lead_time_and_come_earliest_infusion_first() -> None:
    found = find_chains(query(), [EVERY], SERVICES, network())
    assert found.chains and not found.reasons
    assert len(found.chains) == 5
    for chain in found.chains:
        aph, mfg, inf = chain.slots
        assert 2 * DAY <= mfg.start - aph.start <= 5 * DAY
        low = 30 * DAY if inf.service.endswith("inf-b") else 28 * DAY
        assert low <= inf.start - mfg.start <= 35 * DAY
    best = found.chains[0].slots
    assert best[0].start == T0 + 9 * timedelta(hours=1)
    assert best[2].start - best[0].start == 30 * DAY  # 2 d + 28 d: the earliest infusion
    keys = [c.key for c in found.chains]
    assert keys == sorted(keys)
    # Five real choices: no two from the same first day at the same sites.
    assert len({(c.slots[0].start.date(), tuple(s.service for s in c.slots))
                for c in found.chains}) == 5


def test_a_country_and_a_priority_change_the_lead_time() -> None:
    german = Route(1, {**EVERY.services, "infusion": ("HealthcareService/inf-b",)})
    found = find_chains(query(count=1), [german], SERVICES, network())
    aph, mfg, inf = found.chains[0].slots
    assert inf.start - mfg.start == 30 * DAY
    urgent = find_chains(query(count=1, priority="urgent"), [EVERY], SERVICES, network())
    aph, mfg, _ = urgent.chains[0].slots
    assert mfg.start - aph.start == 1 * DAY


def test_routes_are_tried_by_priority() -> None:
    first = Route(1, {"apheresis": ("HealthcareService/aph-a",),
                      "manufacturing": ("HealthcareService/mfg",),
                      "infusion": ("HealthcareService/inf-a",)}, "route-1")
    second = Route(2, {"apheresis": ("HealthcareService/aph-b",),
                       "manufacturing": ("HealthcareService/mfg",),
                       "infusion": ("HealthcareService/inf-b",)}, "route-2")
    found = find_chains(query(), [second, first], SERVICES, network())
    assert {c.route.name for c in found.chains} == {"route-1"}
    # No apheresis at A: priority 2 it is, and the reason priority 1 failed is kept aside.
    found = find_chains(query(), [second, first], SERVICES, network(**{"aph-a": []}))
    assert {c.route.name for c in found.chains} == {"route-2"}
    assert all(c.slots[0].service.endswith("aph-b") for c in found.chains)
    # A chain never mixes the sites of two routes.
    for chain in found.chains:
        assert chain.slots[2].service.endswith("inf-b")


def test_full_slots_and_quotas_are_skipped() -> None:
    full_monday = daily("HealthcareService/mfg", 0, 40)
    full_monday[2] = OpenSlot(full_monday[2].id, full_monday[2].service, full_monday[2].start,
                              full_monday[2].end, free=0)
    found = find_chains(query(count=1), [EVERY], SERVICES, network(mfg=full_monday))
    assert found.chains[0].slots[1].start.date() != (T0 + 2 * DAY).date()
    # Week 1 of manufacturing is used up for this centre: the first chain starts week 2.
    quota = Quota(frozenset({"HealthcareService/mfg"}), "week", 1, {T0.date(): 1})
    found = find_chains(query(count=1), [EVERY], SERVICES, network(), [quota])
    assert found.chains[0].slots[1].start >= T0 + 7 * DAY


def test_windows_and_the_patients_calendar() -> None:
    # The patient has an appointment on the first two mornings.
    busy = ((T0, T0 + 2 * DAY),)
    found = find_chains(query(count=1, busy=busy), [EVERY], SERVICES, network())
    assert found.chains[0].slots[0].start >= T0 + 2 * DAY
    window = {"infusion": (T0 + 50 * DAY, T0 + 200 * DAY)}
    found = find_chains(query(count=1, windows=window), [EVERY], SERVICES, network())
    assert found.chains[0].slots[2].start >= T0 + 50 * DAY


def test_pinned_steps_stay_and_the_rest_follow() -> None:
    pinned = daily("HealthcareService/aph-a", 10, 10)[0]
    found = find_chains(query(count=1, pinned={"apheresis": pinned}), [EVERY], SERVICES,
                        network(**{"aph-a": []}))
    assert found.chains[0].slots[0] == pinned
    assert found.chains[0].slots[1].start - pinned.start == 2 * DAY


def test_reasons_when_there_is_no_chain() -> None:
    found = find_chains(query(), [EVERY], SERVICES, network(**{"aph-a": [], "aph-b": []}))
    assert not found.chains
    assert "no open apheresis slot" in found.reasons[0]
    # Manufacturing only opens 10 days after the last apheresis: no lead time fits.
    found = find_chains(query(latest=T0 + 5 * DAY), [EVERY], SERVICES,
                        network(mfg=daily("HealthcareService/mfg", 40, 50)))
    assert "no open manufacturing slot 2 d to 5 d after any apheresis slot" in found.reasons[0]
    quota = Quota(frozenset({"HealthcareService/mfg"}), "month", 0)
    found = find_chains(query(), [EVERY], SERVICES, network(), [quota])
    assert "quota is used up" in found.reasons[0]
    no_route = Route(1, {"apheresis": ("HealthcareService/aph-a",)})
    found = find_chains(query(), [no_route], SERVICES, network())
    assert "no route gives a site for every step" in found.reasons[0]


def test_the_search_reads_only_the_weeks_it_needs() -> None:
    store = network()
    find_chains(query(latest=T0 + 90 * DAY), [EVERY], SERVICES, store)
    first_step_reads = [end for start, end in store.reads if start < T0 + DAY]
    assert max(first_step_reads) <= T0 + 14 * DAY


def test_later_steps_are_read_only_as_far_as_the_search_goes() -> None:
    """The first chain ends with an infusion on day 30: of the infusion lead's weeks, only
    the day the scan reached is read."""
    store = network()
    found = find_chains(query(count=1), [EVERY], SERVICES, store)
    assert found.chains[0].slots[-1].start == T0 + 30 * DAY + 9 * timedelta(hours=1)
    infusion_reads = [end for start, end in store.reads if start >= T0 + 28 * DAY]
    assert infusion_reads and max(infusion_reads) <= T0 + 31 * DAY


def test_check_chain_names_what_is_wrong() -> None:
    aph = daily("HealthcareService/aph-a", 0, 0)[0]
    mfg = daily("HealthcareService/mfg", 3, 3)[0]
    inf = daily("HealthcareService/inf-a", 31, 31)[0]
    assert check_chain(query(), [EVERY], SERVICES, [aph, mfg, inf]) is None
    late = daily("HealthcareService/inf-a", 60, 60)[0]
    problem = check_chain(query(), [EVERY], SERVICES, [aph, mfg, late])
    assert problem is not None and "lead time is 28 d to 35 d" in problem
    assert "needs a manufacturing service" in str(check_chain(query(), [EVERY], SERVICES,
                                                              [aph, aph, inf]))
    split = [Route(1, {"apheresis": ("HealthcareService/aph-a",),
                       "manufacturing": ("HealthcareService/mfg",),
                       "infusion": ("HealthcareService/inf-b",)})]
    assert check_chain(query(), split, SERVICES, [aph, mfg, inf]) == "no route joins these sites"
    # Booked without a published slot (no id): off the route is allowed, the lead is not.
    override = OpenSlot("", "HealthcareService/inf-a", inf.start, inf.end)
    assert check_chain(query(), split, SERVICES, [aph, mfg, override]) is None


def test_quota_periods() -> None:
    assert period_start("week", datetime(2027, 1, 10, tzinfo=UTC)).isoformat() == "2027-01-04"
    assert period_start("month", datetime(2027, 1, 10, tzinfo=UTC)).isoformat() == "2027-01-01"


def test_a_step_pinned_beyond_its_lead_still_finds_the_steps_after_it() -> None:
    """A manufacturing delay pins manufacturing 20 days later than its lead allows after
    apheresis: infusion is still found, within its lead of the delayed manufacturing."""
    apheresis = daily("HealthcareService/aph-a", 0, 0)[0]
    delayed = daily("HealthcareService/mfg", 25, 25)[0]
    found = find_chains(query(count=1, pinned={"apheresis": apheresis,
                                               "manufacturing": delayed}),
                        [EVERY], SERVICES, network())
    assert found.chains, found.reasons
    infusion = found.chains[0].slots[2]
    assert 28 * DAY <= infusion.start - delayed.start <= 35 * DAY
