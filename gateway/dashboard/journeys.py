"""Where one journey stands, for the dashboard: a frozen summary of one CarePlan made from
its Tasks, its open Flags and its Patient, as the orchestrator writes them
(orchestration/writes.py). Pure: FHIR dicts in, frozen values out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from gateway.auth.redaction import BLIND_ROLES
from gateway.custody.coi import coi_of
from orchestration.demo import COLLECTION_STAGES
from orchestration.engine import marked_overdue
from orchestration.protocol import EXT, ProtocolFormError, from_plan_definition
from orchestration.state import Run, plan_state

INFUSION_STAGE = "infusion"
FLAG_ABOUT = EXT + "flag-about"
CLOSED = frozenset({"completed", "revoked", "entered-in-error"})
"""CarePlan statuses after which a journey no longer counts as running."""
DAY_SECONDS = 86_400


def instant(value: Any) -> datetime | None:
    """A FHIR dateTime as an aware UTC datetime (a date alone is its midnight, UTC);
    None when absent or unreadable: one bad value must not hide a whole journey."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)  # Python 3.11 reads the "Z"
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def reference(element: Any) -> str | None:
    """The `reference` of a Reference element, if it has one."""
    value = element.get("reference") if isinstance(element, dict) else None
    return value if isinstance(value, str) and value else None


# -- what the catalogue knows: therapies (protocols) and organisation names --------------
@dataclass(frozen=True)
class StageInfo:
    id: str
    title: str
    parent: str | None = None  # the enclosing stage, for sub-stages


@dataclass(frozen=True)
class Therapy:
    """A protocol as the dashboard shows it: its canonical url, title and stages in order."""

    url: str
    title: str
    stages: tuple[StageInfo, ...] = ()
    order: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    """Each stage's position in `stages` (set by therapy_of)."""

    def stage(self, stage_id: str) -> StageInfo | None:
        position = self.order.get(stage_id)
        return self.stages[position] if position is not None else None


def therapy_of(plan: dict[str, Any]) -> Therapy:
    """A stored PlanDefinition's therapy; a plan the engine cannot read keeps its title
    and url, and its stages are then named by the Tasks themselves."""
    url = str(plan.get("url") or f"PlanDefinition/{plan.get('id')}")
    title = str(plan.get("title") or plan.get("name") or url)
    try:
        protocol = from_plan_definition(plan)
    except ProtocolFormError:
        return Therapy(url, title)
    stages = tuple(StageInfo(s.id, s.title, s.parent) for s in protocol.stages.values())
    return Therapy(url, title, stages, {s.id: n for n, s in enumerate(stages)})


@dataclass(frozen=True)
class Catalogue:
    """Names the summaries need: therapies by canonical ("url" and "url|version") and
    organisation names by reference ("Organization/x")."""

    therapies: Mapping[str, Therapy] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)

    def therapy(self, canonicals: Iterable[str]) -> Therapy | None:
        for canonical in canonicals:
            found = (self.therapies.get(canonical)
                     or self.therapies.get(canonical.partition("|")[0]))
            if found is not None:
                return found
        return None

    def name(self, ref: str | None) -> str:
        if ref is None:
            return "—"
        return self.names.get(ref, ref)


def catalogue_of(plans: Iterable[dict[str, Any]], names: Mapping[str, str]) -> Catalogue:
    """Every stored PlanDefinition under "url|version", and under its bare url the
    highest version (compared as text: protocol versions here are 1, 1.0.0…)."""
    therapies: dict[str, Therapy] = {}
    for plan in sorted(plans, key=lambda p: str(p.get("version") or "")):
        therapy = therapy_of(plan)
        therapies[therapy.url] = therapy
        if plan.get("version"):
            therapies[f"{therapy.url}|{plan['version']}"] = therapy
    return Catalogue(therapies, dict(names))


# -- one journey -------------------------------------------------------------------------
@dataclass(frozen=True)
class StageRun:
    """A stage's latest run. `outcome`: active, done, failed or skipped (orchestration's
    Run); `status` the Task's own status."""

    stage: str
    title: str
    parent: str | None  # the enclosing stage, for a sub-stage
    run: int
    outcome: str
    status: str | None
    planned_start: datetime | None  # Task.restriction.period
    planned_end: datetime | None
    started_at: datetime | None  # Task.executionPeriod
    ended_at: datetime | None
    owner: str | None
    task_id: str | None
    overdue: bool


@dataclass(frozen=True)
class OverdueTask:
    """An open Task the orchestrator marked overdue (businessStatus `overdue`)."""

    task_id: str
    stage: str
    title: str
    owner: str | None
    owner_label: str
    due: datetime


@dataclass(frozen=True)
class Escalation:
    """An open (status active) Flag the gateway raised about this journey: overdue Tasks
    (category admin) and chain-of-identity stops or excursions (safety). A coordinator
    acknowledges one by making it inactive; it is then closed and left out."""

    flag_id: str
    text: str
    since: datetime | None
    about: str | None  # "Task/<id>" (or what else the Flag is about)
    category: str | None


@dataclass(frozen=True)
class JourneySummary:
    """One enrolment as the dashboard shows it. Labels are resolved when it is made; a
    renamed organisation or protocol gets its journeys summarised again (board.py)."""

    careplan_id: str
    status: str  # CarePlan.status
    patient: str | None
    patient_label: str
    coi: str | None  # the chain-of-identity code, once assigned
    therapy: str | None  # the PlanDefinition's canonical url (no version)
    therapy_title: str
    site: str | None  # the treatment centre: the patient's organisation, else the author
    site_label: str
    stages: tuple[StageRun, ...]  # in protocol order
    current: tuple[str, ...]  # stage ids with an active run, in protocol order (while running)
    started: datetime | None
    ended: datetime | None  # when it stopped running (completed or revoked)
    collected_at: datetime | None
    infused_at: datetime | None
    vein_to_vein_days: float | None
    overdue: tuple[OverdueTask, ...]  # while running
    escalations: tuple[Escalation, ...]  # newest first
    owners: frozenset[str]  # every Task's owner
    organizations: frozenset[str]  # who may see it: site, author, every Task owner


def summarise(careplan: dict[str, Any], tasks: Iterable[dict[str, Any]],
              flags: Iterable[dict[str, Any]], patient: dict[str, Any] | None,
              catalogue: Catalogue) -> JourneySummary:
    """The journey of one CarePlan: `tasks` are those based on it, `flags` candidates
    about it (only active ones are kept), `patient` its subject when stored."""
    tasks = list(tasks)
    therapy = catalogue.therapy(careplan.get("instantiatesCanonical", []))
    runs = plan_state(careplan, tasks).runs
    stages = tuple(_stage_run(run, therapy) for run in _ordered(runs, therapy))
    site = (reference((patient or {}).get("managingOrganization"))
            or reference(careplan.get("author")))
    owners = frozenset(o for t in tasks if (o := reference(t.get("owner"))))
    collected, infused = _collected_at(stages), _ended(stages, INFUSION_STAGE)
    running = careplan.get("status") not in CLOSED  # a closed plan has nothing under way
    return JourneySummary(
        careplan_id=str(careplan["id"]), status=str(careplan.get("status", "unknown")),
        patient=reference(careplan.get("subject")), patient_label=patient_label(patient),
        coi=coi_of(careplan), therapy=therapy.url if therapy else _bare_canonical(careplan),
        therapy_title=therapy.title if therapy else (_bare_canonical(careplan) or "—"),
        site=site, site_label=catalogue.name(site), stages=stages,
        current=tuple(s.stage for s in stages if running and s.outcome == "active"),
        started=_started(careplan, tasks), ended=_ended_at(careplan, stages),
        collected_at=collected, infused_at=infused,
        vein_to_vein_days=_days_between(collected, infused),
        overdue=tuple(_overdue(stages, catalogue)) if running else (),
        escalations=_escalations(flags),
        owners=owners,
        organizations=frozenset({*owners, *(r for r in (
            site, reference(careplan.get("author")),
            reference((patient or {}).get("managingOrganization"))) if r)}))


def patient_label(patient: dict[str, Any] | None) -> str:
    """The patient's name as people write it ("Élodie Durand"); "—" when unknown."""
    for name in (patient or {}).get("name", []):
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("given", []), name.get("family") or ""]
        written = " ".join(p for p in parts if p)
        if written:
            return written
    return "—"


def _bare_canonical(careplan: dict[str, Any]) -> str | None:
    canonicals = careplan.get("instantiatesCanonical") or []
    return str(canonicals[0]).partition("|")[0] if canonicals else None


def _ordered(runs: Mapping[str, Run], therapy: Therapy | None) -> list[Run]:
    """Runs in the protocol's order; stages it does not name after them, by id."""
    order = therapy.order if therapy else {}
    return sorted(runs.values(), key=lambda r: (order.get(r.stage, len(order)), r.stage))


def _stage_run(run: Run, therapy: Therapy | None) -> StageRun:
    task = run.task or {}
    info = therapy.stage(run.stage) if therapy else None
    planned, executed = run.period, task.get("executionPeriod", {})
    title = info.title if info else str(task.get("description") or run.stage)
    return StageRun(
        stage=run.stage, title=title, parent=info.parent if info else None, run=run.number,
        outcome=run.outcome,
        status=task.get("status"), planned_start=instant(planned.get("start")),
        planned_end=instant(planned.get("end")), started_at=instant(executed.get("start")),
        ended_at=instant(executed.get("end")) or run.finished_at,
        owner=reference(task.get("owner")), task_id=task.get("id"),
        overdue=run.outcome == "active" and marked_overdue(task))


def _overdue(stages: tuple[StageRun, ...], catalogue: Catalogue) -> Iterable[OverdueTask]:
    for stage in stages:
        if stage.overdue and stage.task_id and stage.planned_end is not None:
            yield OverdueTask(stage.task_id, stage.stage, stage.title, stage.owner,
                              catalogue.name(stage.owner), stage.planned_end)


def _ended(stages: tuple[StageRun, ...], stage_id: str) -> datetime | None:
    """When the stage's latest run was done (None while it is not)."""
    return next((s.ended_at for s in stages if s.stage == stage_id and s.outcome == "done"),
                None)


def _collected_at(stages: tuple[StageRun, ...]) -> datetime | None:
    """The end of the collection: the first of the collection stages done (as the demo's
    summary reads vein-to-vein: apheresis, else a collection step)."""
    return next((e for s in COLLECTION_STAGES if (e := _ended(stages, s))), None)


def _days_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds() / DAY_SECONDS


def _started(careplan: dict[str, Any], tasks: list[dict[str, Any]]) -> datetime | None:
    """CarePlan.period.start, else when it was created, else its first Task's authoredOn."""
    given = (instant(careplan.get("period", {}).get("start"))
             or instant(careplan.get("created")))
    if given is not None:
        return given
    authored = [a for t in tasks if (a := instant(t.get("authoredOn")))]
    return min(authored) if authored else None


def _ended_at(careplan: dict[str, Any], stages: tuple[StageRun, ...]) -> datetime | None:
    """For a closed plan: CarePlan.period.end (the orchestrator sets it on completion),
    else its last stage's end, else when it was last written."""
    if careplan.get("status") not in CLOSED:
        return None
    ends = [s.ended_at for s in stages if s.ended_at is not None]
    return (instant(careplan.get("period", {}).get("end")) or (max(ends) if ends else None)
            or instant(careplan.get("meta", {}).get("lastUpdated")))


def _escalations(flags: Iterable[dict[str, Any]]) -> tuple[Escalation, ...]:
    found = {str(f["id"]): Escalation(
        flag_id=str(f["id"]), text=_flag_text(f), since=instant(f.get("period", {}).get("start")),
        about=flag_about(f), category=_category(f))
        for f in flags if f.get("status") == "active" and f.get("id")}
    oldest = datetime.min.replace(tzinfo=UTC)
    return tuple(sorted(found.values(), key=lambda e: (e.since or oldest, e.flag_id),
                        reverse=True))


def flag_about(flag: dict[str, Any]) -> str | None:
    """What a Flag the gateway raised is about (its flag-about extension)."""
    return next((reference(e.get("valueReference")) for e in flag.get("extension", [])
                 if e.get("url") == FLAG_ABOUT), None)


def _flag_text(flag: dict[str, Any]) -> str:
    code = flag.get("code", {})
    displays = [c.get("display") for c in code.get("coding", []) if c.get("display")]
    return str(code.get("text") or (displays[0] if displays else "Flag"))


def _category(flag: dict[str, Any]) -> str | None:
    codes = [c.get("code") for cat in flag.get("category", []) for c in cat.get("coding", [])]
    return next((str(c) for c in codes if c), None)


# -- who looks, and which journeys they ask for ------------------------------------------
SEES_ALL = frozenset({"admin", "ehr"})
TREATMENT_CENTRE = "treatment-centre"


@dataclass(frozen=True)
class Viewer:
    """Who looks at the board, with the meaning of gateway/auth/policies.py: admin and
    ehr see every journey; a treatment centre its own patients' (the journey's site, the
    patient's managing organisation or else the plan's author, is its organisation); any
    other partner the journeys in which it owns a Task. Roles that work by chain of
    identity alone (gateway/auth/redaction.py) never see a patient's name."""

    role: str
    organization: str  # "Organization/<id>"

    def sees(self, journey: JourneySummary) -> bool:
        if self.role in SEES_ALL:
            return True
        if self.role == TREATMENT_CENTRE:
            return journey.site == self.organization
        return self.organization in journey.owners

    def patient_label(self, journey: JourneySummary) -> str:
        if self.role not in BLIND_ROLES:
            return journey.patient_label
        return journey.coi or f"Journey {journey.careplan_id[:8]}"


@dataclass(frozen=True)
class Filters:
    """What the programme page is narrowed to: a therapy (its PlanDefinition's canonical
    url), a site ("Organization/<id>"), and bounds on the day a journey started (both
    inclusive, UTC). A journey with no known start is left out once a bound is given."""

    therapy: str | None = None
    site: str | None = None
    since: date | None = None
    until: date | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        """From the page's query string; ValueError with a message for the person who
        typed it when a date is not one."""
        value = {k: (query.get(k) or "").strip() or None
                 for k in ("therapy", "site", "since", "until")}
        since, until = _day(value["since"], "since"), _day(value["until"], "until")
        if since and until and since > until:
            raise ValueError(f"'since' ({since}) is after 'until' ({until})")
        therapy = value["therapy"].partition("|")[0] if value["therapy"] else None
        return cls(therapy, value["site"], since, until)

    def admits(self, journey: JourneySummary) -> bool:
        if self.therapy is not None and journey.therapy != self.therapy:
            return False
        if self.site is not None and journey.site != self.site:
            return False
        if self.since is None and self.until is None:
            return True
        if journey.started is None:
            return False
        day = journey.started.date()
        return ((self.since is None or day >= self.since)
                and (self.until is None or day <= self.until))


def _day(text: str | None, name: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"'{name}' must be a date written as YYYY-MM-DD, such as "
                         f"2026-03-01 (not '{text[:40]}')") from None
