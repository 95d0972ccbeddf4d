"""The custody exceptions panel: temperature excursions and stopped handoffs, from the
safety Flags the server raised for them (gateway/custody/excursions.py, handoffs.py), with
the product, enrolment and chain of identity each concerns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, and_, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.selectable import Alias

from gateway.auth.policies import instance_criteria, role_allows
from gateway.custody.coi import coi_of, eye_readable
from gateway.custody.excursions import FLAGGED
from gateway.dashboard.health.scope import Viewer, day_span, unrestricted
from gateway.scheduling.slots import local_id
from gateway.store import search_query, search_sql
from gateway.store.database import Database
from gateway.store.repository import Repository
from gateway.store.schema import chains_of_identity, resources, sp_date, sp_reference
from gateway.store.timeparse import moment_of
from orchestration.protocol import EXT

R = resources
PRODUCTS = ("BiologicallyDerivedProduct", "Specimen")
FLAG_ABOUT = EXT + "flag-about"
SAFETY = "safety"  # the Flag category custody problems are raised under


@dataclass(frozen=True)
class CustodyException:
    """One custody problem, as the Flag the server raised for it says."""

    kind: str  # "excursion" (temperature) | "custody" (a wrong scan stopped a handoff)
    text: str
    at: datetime  # when it was raised (Flag.period.start)
    status: str  # the Flag's: active | inactive
    flag: str  # Flag/<id>
    about: str  # what raised it: Observation/<id> (excursion), Task/<id> (custody)
    product: str | None  # BiologicallyDerivedProduct/<id> or Specimen/<id>
    careplan: str | None  # CarePlan/<id>
    patient: str | None  # Patient/<id>; None for roles that may not read patients
    coi: str | None  # the enrolment's chain of identity, eye-readable


@dataclass(frozen=True)
class CustodyExceptions:
    items: tuple[CustodyException, ...]  # newest first, at most the limit asked
    total: int  # how many the viewer may see in the range

    @property
    def more(self) -> int:
        return self.total - len(self.items)


@dataclass(frozen=True)
class _Raised:
    """A Flag read as a custody problem, before visibility and description."""

    flag_id: str
    kind: str
    text: str
    at: int
    status: str
    about: tuple[str, str]  # (type, id) of the Observation or custody Task
    patient: str | None


def custody_exceptions(db: Database, viewer: Viewer, since: date, until: date,
                       limit: int = 50) -> CustodyExceptions:
    """Excursions and stopped handoffs raised from `since` to `until` (UTC days), newest
    first. Both kinds leave a safety Flag (gateway/custody/excursions.py, handoffs.py's
    record_stop): the Flags of the range are found through their date index, and only
    those are read."""
    low, high = day_span(since, until)
    partner = not unrestricted(viewer) and viewer.role != "treatment-centre"
    with db.read() as conn:
        raised = [r for r in map(_as_raised, _flags(conn, viewer, low, high)) if r]
        products = _products_of(conn, [r.about for r in (raised if partner else raised[:limit])])
        shown = _partner_sees(conn, viewer, raised, products) if partner else raised
        items = _described(conn, viewer, shown[:limit], products)
    return CustodyExceptions(tuple(items), len(shown))


def _flags(conn: Connection, viewer: Viewer, low: int, high: int) -> list[Any]:
    """(id, content, start) of the Flags raised in [low, high), newest first; for a
    treatment centre only those on its patients (Patient.managingOrganization). Both
    kinds are safety Flags: the bodies of others (overdue steps: most Flags) are left in
    the database rather than sent and parsed; `_as_raised` still decides."""
    raised = sp_date.alias("raised")
    query = (select(R.c.res_id, R.c.content, raised.c.low)
             .join_from(raised, R, and_(R.c.res_type == raised.c.res_type,
                                        R.c.res_id == raised.c.res_id))
             .where(raised.c.res_type == "Flag", raised.c.param == "date",
                    raised.c.low >= low, raised.c.low < high, R.c.deleted.is_(False),
                    _mentions(conn, SAFETY))
             .order_by(raised.c.low.desc(), R.c.res_id.desc()))
    if viewer.role == "treatment-centre":
        query = query.where(_on_patient_of(viewer.organization))
    return list(conn.execute(query))


def _mentions(conn: Connection, word: str) -> Any:
    """The stored body holds `word` (bytes compared in the database: PostgreSQL's bytea
    LIKE, SQLite's instr, which LIKE on a BLOB is not)."""
    if conn.dialect.name == "postgresql":
        return R.c.content.op("LIKE")(b"%" + word.encode() + b"%")
    return func.instr(R.c.content, word.encode()) > 0


def _on_patient_of(organization: str) -> Any:
    """The Flag's subject is a Patient whose managingOrganization is `organization`: the
    centre's patients, then their Flags, each through its index (not a probe per Flag)."""
    subject, managed = sp_reference.alias("subject"), sp_reference.alias("managed")
    patients = select(managed.c.res_id).where(
        managed.c.res_type == "Patient", managed.c.param == "organization",
        managed.c.target_type == "Organization", managed.c.url.is_(None),
        managed.c.target_id == organization.removeprefix("Organization/"))
    flags = select(subject.c.res_id).where(
        subject.c.res_type == "Flag", subject.c.param == "subject",
        subject.c.target_type == "Patient", subject.c.url.is_(None),
        subject.c.target_id.in_(patients))
    return R.c.res_id.in_(flags)


def _as_raised(row: Any) -> _Raised | None:
    """The Flag as a custody problem; None for other Flags (an overdue step…). An
    excursion's Flag names its Observation (identifier FLAGGED); a stopped handoff's is a
    safety Flag about the custody Task."""
    flag = orjson.loads(row.content)
    if flag.get("status") == "entered-in-error":
        return None
    about: dict[str, Any] = next((e.get("valueReference", {})
                                  for e in flag.get("extension", [])
                                  if e.get("url") == FLAG_ABOUT), {})
    observation = next((i.get("value") for i in flag.get("identifier", [])
                        if i.get("system") == FLAGGED), None)
    if isinstance(observation, str) and observation.startswith("Observation/"):
        kind, target = "excursion", ("Observation", observation.split("/")[1])
    elif _is_safety(flag) and (task_id := local_id(about, "Task")):
        kind, target = "custody", ("Task", task_id)
    else:
        return None
    patient_id = local_id(flag.get("subject"), "Patient")
    return _Raised(row.res_id, kind, str(flag.get("code", {}).get("text") or ""), row.low,
                   str(flag.get("status") or ""), target,
                   f"Patient/{patient_id}" if patient_id else None)


def _is_safety(flag: dict[str, Any]) -> bool:
    return any(c.get("code") == SAFETY for concept in flag.get("category", [])
               for c in concept.get("coding", []))


def _products_of(conn: Connection, about: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The product each Observation or custody Task is about (its `focus`)."""
    found = {}
    for resource_type in {t for t, _ in about}:
        ids = [i for t, i in about if t == resource_type]
        for source, target in _references(conn, resource_type, ids, "focus", PRODUCTS):
            found[(resource_type, source)] = target
    return found


class _ByResource(Alias):
    """An index table read through its (res_type, res_id) index: without statistics,
    SQLite would rather scan the (res_type, param) index, every Observation's focus."""

    inherit_cache = True


@compiles(_ByResource)
def _by_resource_sql(element: Any, compiler: Any, **kw: Any) -> str:
    return str(compiler.visit_alias(element, **kw))


@compiles(_ByResource, "sqlite")
def _by_resource_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    text = str(compiler.visit_alias(element, **kw))
    return f"{text} INDEXED BY ix_{element.element.name}_resource" if kw.get("asfrom") else text


def _references(conn: Connection, resource_type: str, ids: list[str], param: str,
                targets: tuple[str, ...]) -> list[tuple[str, str]]:
    """(id, "Type/id") of each local reference `param` of these resources makes to a
    resource of one of the `targets` types, from the reference index."""
    if not ids:
        return []
    ref = _ByResource._construct(sp_reference, name="refs")
    rows = conn.execute(select(ref.c.res_id, ref.c.target_type, ref.c.target_id).where(
        ref.c.res_type == resource_type, ref.c.res_id.in_(ids), ref.c.param == param,
        ref.c.target_type.in_(targets), ref.c.url.is_(None)))
    return [(r.res_id, f"{r.target_type}/{r.target_id}") for r in rows]


def _partner_sees(conn: Connection, viewer: Viewer, raised: list[_Raised],
                  products: dict[tuple[str, str], str]) -> list[_Raised]:
    """A partner sees a problem when its role's policy lets it see what raised it (its
    Task, the Observation it performed) or else the product concerned (one its Tasks
    focus on), asked in that order: the first answers most, and costs least."""
    seen = _visible(conn, viewer, {r.about for r in raised})
    rest = {r.about: _key(products[r.about]) for r in raised
            if r.about not in seen and r.about in products}
    handled = _visible(conn, viewer, set(rest.values()))
    seen |= {about for about, product in rest.items() if product in handled}
    return [r for r in raised if r.about in seen]


def _visible(conn: Connection, viewer: Viewer,
             keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for resource_type in {t for t, _ in keys}:
        ids = [i for t, i in keys if t == resource_type]
        found |= {(resource_type, i) for i in _visible_ids(conn, viewer, resource_type, ids)}
    return found


def _key(reference: str) -> tuple[str, str]:
    resource_type, _, resource_id = reference.partition("/")
    return resource_type, resource_id


def _visible_ids(conn: Connection, viewer: Viewer, resource_type: str,
                 ids: list[str]) -> set[str]:
    """Which of these resources exist for the viewer under its role's policy, asked
    with the same search criteria the FHIR API applies (gateway/services/visibility.py).
    The candidates are few and the partner's own data may be many: the criteria are
    tested per candidate, in the select list (in WHERE, PostgreSQL may rather join every
    Observation the partner performed, say, to the candidates)."""
    if not role_allows(viewer.role, resource_type, "r"):
        return set()
    rules = instance_criteria(viewer.role, viewer.organization, resource_type) or []
    query = search_query.parse(resource_type, rules, lenient=False, default_count=1,
                               max_count=1)
    allowed = and_(*search_sql.matches(query)).label("allowed")
    rows = conn.execute(select(R.c.res_id, allowed).where(
        R.c.res_type == resource_type, R.c.res_id.in_(ids)))
    return {row.res_id for row in rows if row.allowed}


def _described(conn: Connection, viewer: Viewer, page: list[_Raised],
               products: dict[tuple[str, str], str]) -> list[CustodyException]:
    """The page's problems with their product, enrolment and chain of identity."""
    plans = _careplans_of(conn, page, products)
    c = chains_of_identity.c
    codes = dict(conn.execute(select(c.careplan_id, c.value).where(
        c.careplan_id.in_(set(plans.values())))).all()) if plans else {}
    shows_patient = role_allows(viewer.role, "Patient", "r")
    items = []
    for r in page:
        plan = plans.get(r.flag_id)
        items.append(CustodyException(
            r.kind, r.text, moment_of(r.at), r.status, f"Flag/{r.flag_id}",
            "/".join(r.about), products.get(r.about), f"CarePlan/{plan}" if plan else None,
            r.patient if shows_patient else None,
            eye_readable(codes[plan]) if plan in codes else None))
    return items


def _careplans_of(conn: Connection, page: list[_Raised],
                  products: dict[tuple[str, str], str]) -> dict[str, str]:
    """Flag id -> CarePlan id: a custody Task's basedOn, else the enrolment whose chain
    of identity the product carries."""
    tasks = [r.about[1] for r in page if r.about[0] == "Task"]
    based_on = {task: plan.split("/")[1]
                for task, plan in _references(conn, "Task", tasks, "based-on", ("CarePlan",))}
    carried = _careplans_by_product(conn, {products[r.about] for r in page
                                           if r.about in products})
    plans = {}
    for r in page:
        plan = based_on.get(r.about[1]) if r.about[0] == "Task" else None
        plan = plan or carried.get(products.get(r.about, ""))
        if plan:
            plans[r.flag_id] = plan
    return plans


def _careplans_by_product(conn: Connection, references: set[str]) -> dict[str, str]:
    """Product reference -> CarePlan id of the enrolment whose chain of identity it
    carries (chains_of_identity: each code is one enrolment's)."""
    found = Repository(conn).read_many([_key(p) for p in references])
    codes = {f"{t}/{i}": code for (t, i), v in found.items() if (code := coi_of(v.resource()))}
    if not codes:
        return {}
    c = chains_of_identity.c
    plan_of = dict(conn.execute(select(c.value, c.careplan_id).where(
        c.value.in_(set(codes.values())))).all())
    return {product: plan_of[code] for product, code in codes.items() if code in plan_of}

