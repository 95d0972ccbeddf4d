"""AuditEvent over FHIR REST: the server's audit trail, read, searched and verified.

AuditEvents are written by the server alone, one for every request (gateway/audit); no
client creates, changes or deletes one. A partner sees the records of its own
organisation's requests (the `AuditEvent` rule of its role in gateway/auth/policies.py);
admin and EHR clients see all. Searches list records newest first (`_sort=date`: oldest
first) by the time they were recorded.

Search parameters: _id, date (_lastUpdated: the same), altid (the client id), agent (the
client's Organization), entity (a resource the request read or changed), action, outcome,
subtype, type, address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import ColumnElement, func, literal, or_, select, tuple_

from gateway import jsonio
from gateway.audit.chain import verify
from gateway.audit.render import audit_event
from gateway.auth.policies import instance_criteria, sees_everything
from gateway.errors import (
    ForbiddenError,
    InvalidError,
    MethodNotAllowedError,
    NotFoundError,
    NotSupportedError,
)
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.search import lenient
from gateway.store.schema import audit_entities, audit_log
from gateway.store.timeparse import date_range

RECORDED_BY_SERVER = ("AuditEvents are recorded by this server, one for every request; "
                      "they cannot be created, changed or deleted through the API")
_RESULT_PARAMS = {"_count", "_sort", "_cursor", "_total", "_summary", "_format", "_pretty"}
_TOKENS = {"action": audit_log.c.action, "outcome": audit_log.c.outcome,
           "subtype": audit_log.c.subtype, "altid": audit_log.c.client_id,
           "address": audit_log.c.address}
_TYPES = {"rest": "rest", "110114": "login", "110106": "notify"}  # AuditEvent.type -> event_type


def handle(ctx: Context, request: FhirRequest, rest: list[str],
           form: Callable[[FhirRequest], list[tuple[str, str]]]) -> FhirResponse:
    """Type-level and instance-level AuditEvent requests (`rest`: the path after the type)."""
    method = request.method
    if rest == ["$verify-chain"]:
        return verify_chain(ctx, request)
    if method == "GET" and not rest:
        return search(ctx, request.query, lenient(request))
    if method == "POST" and rest == ["_search"]:
        return search(ctx, form(request), lenient(request))
    if method != "GET" or not rest or rest == ["_search"]:
        raise MethodNotAllowedError(RECORDED_BY_SERVER, headers={"Allow": "GET, HEAD"})
    if len(rest) == 1 or (len(rest) == 3 and rest[1] == "_history"):
        if len(rest) == 3 and rest[2] != "1":
            raise NotFoundError(f"AuditEvent/{rest[0]} has one version only, 1")
        return read(ctx, rest[0])
    raise NotSupportedError("AuditEvents have one version each: read or search them")


def _visible(ctx: Context) -> ColumnElement[bool] | None:
    """The rows a partner may see: its own organisation's (None: every row)."""
    if ctx.grant is None:
        return None
    client = ctx.grant.client
    criteria = instance_criteria(client.role, client.organization, "AuditEvent")
    if criteria is None:
        return None
    return audit_log.c.organization == dict(criteria)["agent"]


def read(ctx: Context, resource_id: str) -> FhirResponse:
    missing = NotFoundError(f"AuditEvent/{resource_id} is not known")
    if not resource_id.isdigit() or len(resource_id) > 18:
        raise missing
    statement = select(audit_log).where(audit_log.c.seq == int(resource_id))
    if (visible := _visible(ctx)) is not None:
        statement = statement.where(visible)
    with ctx.db.read() as conn:
        row = conn.execute(statement).first()
    if row is None:
        raise missing
    return FhirResponse(200, jsonio.dumps(audit_event(row)),
                        {"ETag": 'W/"1"', "Location": ctx.url("AuditEvent", resource_id)})


def _values(name: str, value: str) -> list[str]:
    out = [v.split("|", 1)[-1] for v in value.split(",") if v.split("|", 1)[-1]]
    if not out:
        raise InvalidError(f"{name} needs a value")
    return out


def _date(value: str) -> ColumnElement[bool]:
    prefix = value[:2] if value[:2] in ("eq", "ne", "gt", "lt", "ge", "le") else "eq"
    text = value[2:] if value[:2] == prefix else value
    bounds = date_range(text)
    if bounds is None:
        raise InvalidError(f"date={value}: not a FHIR date, e.g. ge2026-11-23T08:00:00Z")
    low, high = bounds
    column = audit_log.c.recorded
    return {"eq": column.between(low, high), "ne": ~column.between(low, high),
            "gt": column > high, "lt": column < low, "ge": column >= low,
            "le": column <= high}[prefix]


def _reference(value: str) -> str:
    parts = value.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else value


def _criterion(name: str, value: str) -> ColumnElement[bool] | None:
    """One search parameter as a condition on the log; None for result parameters."""
    if name in _RESULT_PARAMS:
        return None
    if name == "_id":
        ids = _values(name, value)
        if not all(i.isdigit() and len(i) <= 18 for i in ids):
            return audit_log.c.seq.is_(None)  # ids we never issue match nothing
        return audit_log.c.seq.in_([int(i) for i in ids])
    if name in ("date", "_lastUpdated"):  # a record's lastUpdated is when it was recorded
        return _date(value)
    if name in _TOKENS:
        return _TOKENS[name].in_(_values(name, value))
    if name == "type":
        return audit_log.c.event_type.in_([_TYPES.get(v, v) for v in _values(name, value)])
    if name == "agent":
        return audit_log.c.organization.in_([_reference(v) for v in _values(name, value)])
    if name == "entity":
        refs = [_reference(v) for v in _values(name, value)]
        return or_(audit_log.c.entity.in_(refs),  # rows naming several: audit_entities
                   audit_log.c.seq.in_(select(audit_entities.c.seq)
                                       .where(audit_entities.c.reference.in_(refs))))
    raise InvalidError(f"AuditEvent has no search parameter {name!r} here (supported: "
                       "_id, date, altid, agent, entity, action, outcome, subtype, type, "
                       "address)")


def _count(ctx: Context, params: dict[str, str]) -> int:
    raw = params.get("_count", str(ctx.settings.default_page_size))
    if not raw.isdigit():
        raise InvalidError(f"_count must be a non-negative integer, not {raw!r}")
    return min(int(raw), ctx.settings.max_page_size)


def _conditions(ctx: Context, query: list[tuple[str, str]],
                lenient_: bool) -> list[ColumnElement[bool]]:
    """The search's criteria and what the client may see; with handling=lenient an
    unknown parameter is left out (a malformed date or id is still refused)."""
    conditions = []
    for name, value in query:
        try:
            condition = _criterion(name.split(":")[0], value)
        except InvalidError:
            if lenient_ and name.split(":")[0] not in ("date", "_id"):
                continue
            raise
        if condition is not None:
            conditions.append(condition)
    if (visible := _visible(ctx)) is not None:
        conditions.append(visible)
    return conditions


def _oldest_first(params: dict[str, str]) -> bool:
    sort = params.get("_sort", "-date")
    if sort.lstrip("-") not in ("date", "_lastUpdated"):
        raise InvalidError("AuditEvent sorts by date only (_sort=date or _sort=-date)")
    return not sort.startswith("-")


def search(ctx: Context, query: list[tuple[str, str]], lenient_: bool) -> FhirResponse:
    params = dict(query)
    conditions = _conditions(ctx, query, lenient_)
    oldest_first = _oldest_first(params)
    page = list(conditions)
    if (cursor := params.get("_cursor")) is not None:
        page.append(_after(cursor, oldest_first))
    count = _count(ctx, params)
    order = (audit_log.c.recorded, audit_log.c.seq)
    with ctx.db.read() as conn:
        rows = conn.execute(select(audit_log).where(*page).limit(count + 1).order_by(
            *(order if oldest_first else (column.desc() for column in order)))).all()
        total = None
        if params.get("_total") == "accurate" or params.get("_summary") == "count":
            total = conn.execute(select(func.count()).select_from(audit_log)
                                 .where(*conditions)).scalar_one()
    if params.get("_summary") == "count":
        rows = []
    return FhirResponse(200, jsonio.dumps(_bundle(ctx, query, rows, count, total)))


def _bundle(ctx: Context, query: list[tuple[str, str]], rows: Sequence[Any], count: int,
            total: int | None) -> dict[str, Any]:
    """The searchset: a page of records (`rows` holds one more when there is a next)."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    links = [_link(ctx, "self", query)]
    if count and len(rows) > count:
        last = rows[count - 1]
        kept = [(k, v) for k, v in query if k != "_cursor"]
        links.append(_link(ctx, "next", [*kept, ("_cursor", f"{last.recorded}.{last.seq}")]))
    bundle["link"] = links
    if rows[:count]:
        bundle["entry"] = [{"fullUrl": ctx.url("AuditEvent", str(row.seq)),
                            "resource": audit_event(row), "search": {"mode": "match"}}
                           for row in rows[:count]]
    return bundle


def _after(cursor: str, oldest_first: bool) -> ColumnElement[bool]:
    """The rows past a page's last one ("recorded.seq"), in the search's order."""
    recorded, _, seq = cursor.partition(".")
    if not (recorded.isdigit() and seq.isdigit()):
        raise InvalidError("_cursor is not one this server issued")
    key = tuple_(audit_log.c.recorded, audit_log.c.seq)
    mark = tuple_(literal(int(recorded)), literal(int(seq)))
    return key > mark if oldest_first else key < mark


def _link(ctx: Context, relation: str, pairs: list[tuple[str, str]]) -> dict[str, str]:
    path = ctx.url("AuditEvent")
    return {"relation": relation, "url": f"{path}?{urlencode(pairs)}" if pairs else path}


def verify_chain(ctx: Context, request: FhirRequest) -> FhirResponse:
    """`$verify-chain`: walk the whole trail's hash chain; intact, or the first record that
    does not follow. For clients that see every record (admin, EHR)."""
    if request.method not in ("GET", "POST"):
        raise MethodNotAllowedError("$verify-chain is invoked with GET or POST",
                                    headers={"Allow": "GET, POST"})
    if ctx.grant is not None and not sees_everything(ctx.grant.client.role):
        raise ForbiddenError(f"A {ctx.grant.client.role} client may not verify the whole "
                             "audit trail; it sees only its own organisation's records")
    report = verify(ctx.db).to_json()
    parameters = [{"name": "intact", "valueBoolean": report["intact"]},
                  {"name": "checked", "valueInteger": report["checked"]},
                  {"name": "pending", "valueInteger": report["pending"]}]
    if not report["intact"]:
        if report["brokenAt"]:
            parameters.append({"name": "brokenAt",
                               "valueReference": {"reference": report["brokenAt"]}})
        parameters += [{"name": "position", "valueInteger": report["position"]},
                       {"name": "reason", "valueString": report["reason"]}]
    return FhirResponse(200, jsonio.dumps({"resourceType": "Parameters",
                                           "parameter": parameters}))
