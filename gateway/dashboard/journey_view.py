"""One patient's journey as the journey view shows it: the protocol's stages as a
timeline (planned against actual, deadlines), each stage's Task with its owner and
status, the appointments, the escalations, and the custody chain with each signature's
status. Read as the signed-in person (gateway/dashboard/calls.py): what their role may
not read is simply not shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.custody import report as custody
from gateway.custody.model import CustodyReport
from gateway.dashboard.calls import Caller
from gateway.dashboard.journeys import patient_label, reference
from gateway.errors import FhirError
from gateway.services.context import Context
from orchestration.engine import marked_overdue
from orchestration.protocol import ProtocolFormError, from_plan_definition
from orchestration.state import ACTIVE, parse_instant, task_run_key

MAX_TASKS = 500
TIMELINE_WIDTH = 760  # the drawing width, in SVG units (250 more on its left hold titles)
ACKNOWLEDGED = "https://atm-gateway.org/fhir/StructureDefinition/flag-acknowledged"


@dataclass(frozen=True)
class StageRow:
    """A stage of the protocol and its latest Task (None: not reached yet)."""

    stage: str
    title: str
    task_id: str | None
    status: str  # the Task's status, or "not started"
    owner: str | None  # Organization/<id>
    owner_name: str | None
    planned_start: datetime | None
    deadline: datetime | None
    started: datetime | None
    finished: datetime | None
    overdue: bool
    runs: int  # how many times the stage ran (a failed QC sends it back)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def late_days(self) -> float | None:
        """Finished after its deadline (or still open past it), by how many days."""
        if self.deadline is None:
            return None
        end = self.finished or (datetime.now(UTC) if self.active else None)
        if end is None or end <= self.deadline:
            return None
        return round((end - self.deadline).total_seconds() / 86400, 1)


@dataclass(frozen=True)
class Bar:
    """One stage's row in the timeline: planned window and actual span, in SVG units."""

    title: str
    y: int
    planned: tuple[float, float] | None
    actual: tuple[float, float] | None
    deadline: float | None
    overdue: bool


@dataclass(frozen=True)
class Timeline:
    start: datetime
    end: datetime
    bars: tuple[Bar, ...]
    today: float | None
    ticks: tuple[tuple[float, str], ...]
    height: int


@dataclass(frozen=True)
class Appointment:
    appointment_id: str
    description: str
    start: datetime | None
    end: datetime | None
    status: str
    where: str


@dataclass(frozen=True)
class Escalation:
    flag_id: str
    text: str
    since: datetime | None


@dataclass(frozen=True)
class JourneyView:
    careplan_id: str
    title: str
    therapy: str
    status: str
    patient: str
    coi: str | None
    stages: tuple[StageRow, ...]
    timeline: Timeline | None
    appointments: tuple[Appointment, ...]
    escalations: tuple[Escalation, ...]
    custody: CustodyReport | None
    custody_note: str | None  # why the chain is not shown
    books_chain: bool  # the protocol books a chain of appointments for this journey
    organizations: tuple[tuple[str, str], ...]  # whom a Task may be reassigned to


def _period(value: Any) -> tuple[datetime | None, datetime | None]:
    period = value if isinstance(value, dict) else {}
    return parse_instant(period.get("start")), parse_instant(period.get("end"))


def _named(label: str, subject: str | None) -> str:
    """The patient's name, else the reference (a patient read without a name)."""
    return label if label != "—" else subject or "unknown patient"


async def _maybe(call: Caller, resource_type: str,
                 query: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """A search the person's role may not be allowed: nothing, then."""
    try:
        return await call.search(resource_type, query)
    except FhirError:
        return []


async def _protocol_stages(call: Caller, careplan: dict[str, Any]) -> tuple[
        list[tuple[str, str]], str, bool]:
    """The protocol's stages (id, title) in order, its title, and whether it books."""
    canonical = next(iter(careplan.get("instantiatesCanonical", [])), "")
    url, _, version = canonical.partition("|")
    query = [("url", url)] + ([("version", version)] if version else [])
    plans = await _maybe(call, "PlanDefinition", query) if url else []
    if not plans:
        return [], careplan.get("title") or "therapy", False
    try:
        protocol = from_plan_definition(plans[0])
    except ProtocolFormError:
        return [], plans[0].get("title") or url, False
    stages = [(s.id, s.title) for s in protocol.stages.values()]  # parents first
    return stages, protocol.title, protocol.booking_stage() is not None


def _stage_rows(order: list[tuple[str, str]], tasks: list[dict[str, Any]],
                careplan_id: str, names: dict[str, str]) -> list[StageRow]:
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    for task in tasks:
        key = task_run_key(task)
        if key is None or key[0] != careplan_id:
            continue
        if key[1] not in latest or key[2] > latest[key[1]][0]:
            latest[key[1]] = (key[2], task)
    titles = dict(order)
    for stage, (_, task) in latest.items():  # stages a protocol we cannot read still ran
        titles.setdefault(stage, task.get("description") or stage)
    rows = []
    for stage, title in titles.items():
        run, task = latest.get(stage, (0, {}))
        owner = reference(task.get("owner"))
        planned_start, deadline = _period(task.get("restriction", {}).get("period"))
        started, finished = _period(task.get("executionPeriod"))
        open_ = task.get("status") in ACTIVE
        rows.append(StageRow(
            stage, title, task.get("id"), task.get("status", "not started"), owner,
            names.get(owner or "") or owner, planned_start, deadline, started,
            None if open_ else finished, open_ and marked_overdue(task), run))
    return rows


def timeline(rows: list[StageRow], now: datetime) -> Timeline | None:
    """The stages that have a date, drawn over the span of all their dates."""
    dated = [r for r in rows if any((r.planned_start, r.deadline, r.started, r.finished))]
    moments = [m for r in dated for m in (r.planned_start, r.deadline, r.started, r.finished)
               if m is not None]
    if not moments:
        return None
    start, end = min(moments), max(*moments, now)
    span = max((end - start).total_seconds(), 86400.0)

    def x(moment: datetime | None) -> float | None:
        if moment is None:
            return None
        return round((moment - start).total_seconds() / span * TIMELINE_WIDTH, 1)

    bars = []
    for index, row in enumerate(dated):
        planned = actual = None
        if row.planned_start or row.deadline:
            low = x(row.planned_start or row.deadline) or 0.0
            planned = (low, max((x(row.deadline or row.planned_start) or low) - low, 2.0))
        if row.started:
            low = x(row.started) or 0.0
            actual = (low, max((x(row.finished or now) or low) - low, 2.0))
        bars.append(Bar(row.title, 28 + index * 26, planned, actual, x(row.deadline),
                        row.overdue))
    weeks = max(1, int(span // (7 * 86400)))
    step = 7 * 86400 * max(1, weeks // 8)
    ticks = []
    seconds = 0.0
    while seconds <= span:
        moment = datetime.fromtimestamp(start.timestamp() + seconds, UTC)
        ticks.append((round(seconds / span * TIMELINE_WIDTH, 1), moment.strftime("%d %b")))
        seconds += step
    return Timeline(start, end, tuple(bars), x(now), tuple(ticks), 40 + 26 * len(bars))


def _appointment(resource: dict[str, Any], names: dict[str, str]) -> Appointment:
    where = next((names.get(r) or p.get("actor", {}).get("display") or r
                  for p in resource.get("participant", [])
                  if (r := reference(p.get("actor"))) and r.startswith("HealthcareService/")),
                 "")
    description = (resource.get("description")
                   or next((c.get("text") for c in resource.get("serviceType", [])), None)
                   or "appointment")
    return Appointment(resource["id"], description, parse_instant(resource.get("start")),
                       parse_instant(resource.get("end")), resource.get("status", ""), where)


def _escalation(flag: dict[str, Any]) -> Escalation:
    return Escalation(flag["id"], flag.get("code", {}).get("text") or "escalation",
                      parse_instant(flag.get("period", {}).get("start")))


async def _names(call: Caller, references: set[str]) -> dict[str, str]:
    """Organisations' and services' names, for the references that have one."""
    names: dict[str, str] = {}
    for resource_type in ("Organization", "HealthcareService"):
        ids = sorted(r.split("/", 1)[1] for r in references
                     if r.startswith(resource_type + "/"))
        if ids:
            for found in await _maybe(call, resource_type, [("_id", ",".join(ids)),
                                                            ("_count", str(len(ids)))]):
                names[f"{resource_type}/{found['id']}"] = found.get("name") or found["id"]
    return names


def _custody(call_context: Context, careplan_id: str) -> CustodyReport | None:
    with call_context.reading() as repo:
        version = repo.read("CarePlan", careplan_id)
        if version is None or version.deleted:
            return None
        return custody.build(call_context, repo, version, None)


async def load(call: Caller, careplan_id: str, now: datetime) -> JourneyView:
    """The journey of one CarePlan; NotFoundError when the person may not see it."""
    careplan = await call.json("GET", f"CarePlan/{careplan_id}")
    subject = reference(careplan.get("subject"))
    tasks = await call.search("Task", [("based-on", f"CarePlan/{careplan_id}"),
                                       ("_count", str(MAX_TASKS))])
    order, therapy, books = await _protocol_stages(call, careplan)
    patient = None
    if subject:
        found = await _maybe(call, subject.split("/")[0], [("_id", subject.split("/")[-1])])
        patient = found[0] if found else None
    appointments = await _maybe(call, "Appointment", [("patient", subject), ("_count", "100"),
                                                      ("_sort", "date")]) if subject else []
    flags = [f for f in await _maybe(call, "Flag", [("subject", subject), ("_count", "200")])
             if f.get("status") == "active"] if subject else []
    organizations = await _maybe(call, "Organization", [("_count", "200"), ("_sort", "name")])
    services = {r for a in appointments for p in a.get("participant", [])
                if (r := reference(p.get("actor")))}
    owners = {r for t in tasks if (r := reference(t.get("owner")))}
    names = {f"Organization/{o['id']}": o.get("name") or o["id"] for o in organizations}
    names.update(await _names(call, (services | owners) - set(names)))
    rows = _stage_rows(order, tasks, careplan_id, names)
    try:
        report = await call.run(f"CarePlan/{careplan_id}/$custody-report",
                                lambda ctx: _custody(ctx, careplan_id))
        note = None if report and report.handoffs else "No custody handoff is recorded yet."
    except FhirError as exc:
        report, note = None, f"The custody chain is not shown: {exc}"
    coi = report.coi if report else None
    return JourneyView(
        careplan_id, careplan.get("title") or therapy, therapy, careplan.get("status", ""),
        _named(patient_label(patient), subject), coi,
        tuple(rows), timeline(rows, now),
        tuple(_appointment(a, names) for a in appointments),
        tuple(_escalation(f) for f in flags
              if not any(e.get("url") == ACKNOWLEDGED for e in f.get("extension", []))),
        report, note, books,
        tuple((f"Organization/{o['id']}", o.get("name") or o["id"]) for o in organizations))
