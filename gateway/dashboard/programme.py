"""The programme page's figures (counts, stages, trend, vein-to-vein, the overdue,
escalation and journey lists) for one viewer and filters. Pure: journey summaries
(gateway/dashboard/journeys.py) in, frozen values out; board.py keeps the summaries."""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import accumulate
from typing import Generic, TypeVar

from gateway.dashboard.journeys import (
    DAY_SECONDS,
    Catalogue,
    Filters,
    JourneySummary,
    StageInfo,
    Viewer,
)

# -- the figures, as the page shows them ------------------------------------------------
OVERDUE_LIMIT, ESCALATION_LIMIT, JOURNEY_LIMIT = 100, 100, 200  # rows in each list
TREND_WEEKS = 12  # the trend's range when the filters bound none
BIN_DAYS = 7  # the vein-to-vein histogram's bins
DAY = timedelta(days=1)
T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """The first items of a longer list, and how long the list is."""

    items: tuple[T, ...]
    total: int


@dataclass(frozen=True)
class Counts:
    """Journeys by CarePlan status: active, on-hold (the orchestrator holds a plan with
    no way forward), completed, stopped (revoked); `total` counts every one."""

    total: int
    active: int
    on_hold: int
    completed: int
    stopped: int


@dataclass(frozen=True)
class StageCount:
    stage: str
    title: str
    parent: str | None  # the enclosing stage of a sub-stage
    active: int  # journeys with an active run of the stage
    overdue: int  # of which overdue


@dataclass(frozen=True)
class WeekPoint:
    """One week of the trend: `start` to `end`, both days included."""

    start: date
    end: date
    started: int  # journeys started in the week
    infused: int  # infusions done in the week
    active: int  # journeys running at the week's end


@dataclass(frozen=True)
class Bin:
    """Values from `start` (included) to `end` (excluded) days."""

    start: int
    end: int
    count: int


@dataclass(frozen=True)
class Distribution:
    """Days, to one decimal. Percentiles interpolate linearly between the two nearest
    ranks (Hyndman & Fan type 7, numpy's default): the p-th of n sorted values sits at
    rank (n - 1) * p from 0, so the median of an even count is the mean of the middle
    two."""

    count: int
    median: float | None
    p90: float | None
    min: float | None
    max: float | None
    bins: tuple[Bin, ...]


@dataclass(frozen=True)
class GroupDistribution:
    value: str  # the site's or therapy's reference or url
    label: str
    distribution: Distribution


@dataclass(frozen=True)
class OverdueRow:
    careplan_id: str
    patient_label: str
    therapy_title: str
    site_label: str
    task_id: str
    stage: str
    stage_title: str
    owner: str | None
    owner_label: str
    due: datetime
    days_late: float


@dataclass(frozen=True)
class EscalationRow:
    careplan_id: str
    patient_label: str
    flag_id: str
    text: str
    since: datetime | None
    about: str | None


@dataclass(frozen=True)
class JourneyRow:
    careplan_id: str
    patient_label: str
    therapy_title: str
    site_label: str
    status: str
    current: tuple[str, ...]  # titles of the stages under way (innermost)
    started: date | None
    days_in_journey: int | None  # to now, or to its end once it ended
    overdue: int
    escalations: int


@dataclass(frozen=True)
class Programme:
    """Everything the programme page shows, for one viewer and filters."""

    version: int
    refreshed_at: datetime
    now: datetime
    filters: Filters
    counts: Counts
    by_stage: tuple[StageCount, ...]
    trend: tuple[WeekPoint, ...]
    vein_to_vein: Distribution
    by_site: tuple[GroupDistribution, ...]
    by_therapy: tuple[GroupDistribution, ...]
    overdue: Page[OverdueRow]  # most late first
    escalations: Page[EscalationRow]  # newest first
    journeys: Page[JourneyRow]  # most overdue first, then the oldest


@dataclass(frozen=True)
class Option:
    value: str
    label: str


@dataclass(frozen=True)
class Options:
    """What a viewer may filter by: the therapies and sites of the journeys it sees."""

    therapies: tuple[Option, ...]
    sites: tuple[Option, ...]


# -- computing the figures ---------------------------------------------------------------
def programme_of(journeys: Iterable[JourneySummary], catalogue: Catalogue, viewer: Viewer,
                 filters: Filters, now: datetime, *, version: int,
                 refreshed_at: datetime) -> Programme:
    """The page's figures over the journeys this viewer sees and the filters admit;
    `version` and `refreshed_at` say which state of the board they were taken from."""
    chosen = [j for j in journeys if viewer.sees(j) and filters.admits(j)]
    return Programme(
        version=version, refreshed_at=refreshed_at, now=now, filters=filters,
        counts=_counts(chosen),
        by_stage=_by_stage(chosen, catalogue), trend=_trend(chosen, filters, now),
        vein_to_vein=distribution(j.vein_to_vein_days for j in chosen),
        by_site=_grouped(chosen, lambda j: (j.site, j.site_label)),
        by_therapy=_grouped(chosen, lambda j: (j.therapy, j.therapy_title)),
        overdue=_overdue_rows(chosen, viewer, now), escalations=_escalation_rows(chosen, viewer),
        journeys=_journey_rows(chosen, viewer, now))


def options_of(journeys: Iterable[JourneySummary], viewer: Viewer) -> Options:
    """The therapies and sites of the journeys this viewer sees, by label."""
    therapies: dict[str, str] = {}
    sites: dict[str, str] = {}
    for journey in journeys:
        if viewer.sees(journey):
            if journey.therapy:
                therapies[journey.therapy] = journey.therapy_title
            if journey.site:
                sites[journey.site] = journey.site_label
    return Options(_sorted_options(therapies), _sorted_options(sites))


def _sorted_options(found: dict[str, str]) -> tuple[Option, ...]:
    return tuple(sorted((Option(v, label) for v, label in found.items()),
                        key=lambda o: (o.label.casefold(), o.value)))


def _counts(journeys: list[JourneySummary]) -> Counts:
    status = Counter(j.status for j in journeys)
    return Counts(len(journeys), status["active"], status["on-hold"], status["completed"],
                  status["revoked"])


def _by_stage(journeys: list[JourneySummary], catalogue: Catalogue) -> tuple[StageCount, ...]:
    """Each stage of the protocols in view, in protocol order (several protocols: merged
    by stage id in first-seen order, the protocol with the most journeys first), then
    stages no stored protocol names. Counts are of running journeys."""
    order: dict[str, StageInfo] = {}
    therapies = {t.url: t for t in catalogue.therapies.values()}
    in_view = Counter(j.therapy for j in journeys if j.therapy in therapies)
    for url, _ in sorted(in_view.items(), key=lambda u: (-u[1], therapies[u[0]].title, u[0])):
        for info in therapies[url].stages:
            order.setdefault(info.id, info)
    active = Counter(stage for j in journeys for stage in j.current)
    overdue = Counter(o.stage for j in journeys for o in j.overdue)
    for run in (r for j in journeys if j.therapy not in therapies for r in j.stages):
        order.setdefault(run.stage, StageInfo(run.stage, run.title, run.parent))
    return tuple(StageCount(s.id, s.title, s.parent, active[s.id], overdue[s.id])
                 for s in order.values())


def _trend(journeys: list[JourneySummary], filters: Filters,
           now: datetime) -> tuple[WeekPoint, ...]:
    """Weeks ending on `until` (default today), back to `since` (default 12 weeks)."""
    last = filters.until or now.date()
    first = filters.since or last - timedelta(weeks=TREND_WEEKS) + DAY
    weeks = max(1, -(-((last - first).days + 1) // 7))
    end = datetime.combine(last + DAY, time(), UTC)
    ends = [end - timedelta(weeks=weeks - 1 - k) for k in range(weeks)]  # each one excluded
    started, infused, running = [0] * weeks, [0] * weeks, [0] * (weeks + 1)
    for journey in journeys:
        for counts, moment in ((started, journey.started), (infused, journey.infused_at)):
            if (week := _week_of(ends, moment)) is not None:
                counts[week] += 1
        if journey.started is not None:  # running from the week it started to its end
            running[bisect_right(ends, journey.started)] += 1
            running[bisect_right(ends, journey.ended) if journey.ended else weeks] -= 1
    active = list(accumulate(running[:weeks]))
    return tuple(WeekPoint((e - timedelta(weeks=1)).date(), (e - DAY).date(), started[k],
                           infused[k], active[k]) for k, e in enumerate(ends))


def _week_of(ends: list[datetime], moment: datetime | None) -> int | None:
    if moment is None:
        return None
    week = bisect_right(ends, moment)
    return week if week < len(ends) and moment >= ends[week] - timedelta(weeks=1) else None


def percentile(ordered: list[float], share: float) -> float:
    """Linear between the nearest ranks (see Distribution); `ordered` sorted, not empty."""
    rank = (len(ordered) - 1) * share
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Iterable[float | None]) -> Distribution:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return Distribution(0, None, None, None, None, ())
    return Distribution(len(ordered), round(percentile(ordered, 0.5), 1),
                        round(percentile(ordered, 0.9), 1), round(ordered[0], 1),
                        round(ordered[-1], 1), _bins(ordered))


def _bins(ordered: list[float]) -> tuple[Bin, ...]:
    first = int(ordered[0] // BIN_DAYS) * BIN_DAYS
    counts = Counter(int((v - first) // BIN_DAYS) for v in ordered)
    return tuple(Bin(first + n * BIN_DAYS, first + (n + 1) * BIN_DAYS, counts[n])
                 for n in range(max(counts) + 1))


def _grouped(journeys: list[JourneySummary],
             key: Callable[[JourneySummary], tuple[str | None, str]]
             ) -> tuple[GroupDistribution, ...]:
    """The vein-to-vein distribution of each site or therapy, by label."""
    days: dict[str, list[float]] = defaultdict(list)
    labels: dict[str, str] = {}
    for journey in journeys:
        value, label = key(journey)
        if value is not None and journey.vein_to_vein_days is not None:
            days[value].append(journey.vein_to_vein_days)
            labels[value] = label
    groups = (GroupDistribution(v, labels[v], distribution(d)) for v, d in days.items())
    return tuple(sorted(groups, key=lambda g: (g.label.casefold(), g.value)))


def _overdue_rows(journeys: list[JourneySummary], viewer: Viewer,
                  now: datetime) -> Page[OverdueRow]:
    found = [(o.due, o.task_id, j, o) for j in journeys for o in j.overdue]
    found.sort(key=lambda f: (f[0], f[1]))  # the earliest due is the most late
    return Page(tuple(OverdueRow(
        j.careplan_id, viewer.patient_label(j), j.therapy_title, j.site_label, o.task_id,
        o.stage, o.title, o.owner, o.owner_label, o.due,
        round((now - o.due).total_seconds() / DAY_SECONDS, 1))
        for _, _, j, o in found[:OVERDUE_LIMIT]), len(found))


def _escalation_rows(journeys: list[JourneySummary], viewer: Viewer) -> Page[EscalationRow]:
    oldest = datetime.min.replace(tzinfo=UTC)
    found = [(e.since or oldest, e.flag_id, j, e) for j in journeys for e in j.escalations]
    found.sort(key=lambda f: (f[0], f[1]), reverse=True)
    return Page(tuple(EscalationRow(j.careplan_id, viewer.patient_label(j), e.flag_id,
                                    e.text, e.since, e.about)
                      for _, _, j, e in found[:ESCALATION_LIMIT]), len(found))


def _journey_rows(journeys: list[JourneySummary], viewer: Viewer,
                  now: datetime) -> Page[JourneyRow]:
    latest = datetime.max.replace(tzinfo=UTC)
    ordered = sorted(journeys, key=lambda j: (-len(j.overdue), j.started or latest,
                                              j.careplan_id))
    return Page(tuple(JourneyRow(
        j.careplan_id, viewer.patient_label(j), j.therapy_title, j.site_label, j.status,
        _innermost(j), j.started.date() if j.started else None,
        ((j.ended or now) - j.started).days if j.started else None, len(j.overdue),
        len(j.escalations)) for j in ordered[:JOURNEY_LIMIT]), len(ordered))


def _innermost(journey: JourneySummary) -> tuple[str, ...]:
    """Titles of the stages under way, leaving out a stage whose sub-stage is."""
    active = [s for s in journey.stages if s.outcome == "active"]
    parents = {s.parent for s in active}
    return tuple(s.title for s in active if s.stage not in parents)
