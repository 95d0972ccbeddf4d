"""History of an instance, a type or the whole server, newest first, in pages.

https://hl7.org/fhir/R4/http.html#history. Paging is by keyset on (lastUpdated, type,
id, version), so versions written while a client pages do not shift its pages.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from sqlalchemy import and_, or_, select, tuple_

from gateway import jsonio
from gateway.errors import ForbiddenError, InvalidError, NotFoundError
from gateway.services import visibility
from gateway.services.context import Context, FhirRequest, FhirResponse
from gateway.services.resources import check_known_id
from gateway.store import search_sql
from gateway.store.schema import resource_history as H
from gateway.store.timeparse import date_range, format_instant

# What this server answered each interaction (a delete answers 200 with an OperationOutcome).
STATUS = {"POST": "201 Created", "PUT": "200 OK", "PATCH": "200 OK", "DELETE": "200 OK"}
_KEYS = (H.c.last_updated, H.c.res_type, H.c.res_id, H.c.version)


def history(ctx: Context, request: FhirRequest, resource_type: str | None = None,
            resource_id: str | None = None) -> FhirResponse:
    params = dict(request.query)
    unknown = set(params) - {"_count", "_since", "_at", "_cursor", "_format", "_pretty"}
    if unknown:
        raise InvalidError(f"Unknown history parameter(s): {', '.join(sorted(unknown))}")
    count = _count(ctx, params.get("_count"))
    stmt = select(H).order_by(*(k.desc() for k in _KEYS)).limit(count + 1)
    if resource_type:
        stmt = stmt.where(H.c.res_type == resource_type)
    if resource_id:
        stmt = stmt.where(H.c.res_id == resource_id)
    stmt = _time_window(stmt, params)
    if "_cursor" in params:
        stmt = stmt.where(_before(_cursor_values(params["_cursor"])))
    if resource_id:
        check_known_id(resource_type or "", resource_id)
    if resource_type and not resource_id and visibility.criteria(ctx, resource_type):
        raise ForbiddenError(f"The history of every {resource_type} is not open to your "
                             f"role; read the history of each {resource_type} you see")
    with ctx.reading() as repo:
        if resource_id and repo.read(resource_type or "", resource_id) is None:
            raise NotFoundError(f"{resource_type}/{resource_id} is not known")
        if resource_id:
            visibility.check_visible(ctx, repo, resource_type or "", resource_id)
        rows = list(repo.conn.execute(stmt))
        more = len(rows) > count
        rows = rows[:count]
        recreated = _recreations(repo.conn, rows)
    base = ctx.url(*(p for p in (resource_type, resource_id) if p), "_history")
    keep = [(k, v) for k, v in request.query if k != "_cursor"]
    links = [{"relation": "self", "url": _url(base, request.query)}]
    if more:
        last = rows[-1]
        cursor = search_sql.encode_cursor([last.last_updated, last.res_type, last.res_id,
                                           last.version])
        links.append({"relation": "next", "url": _url(base, [*keep, ("_cursor", cursor)])})
    bundle = {"resourceType": "Bundle", "type": "history", "link": links,
              "entry": [_entry(ctx, row, row in recreated) for row in rows]}
    return FhirResponse(200, jsonio.dumps(bundle))


def _count(ctx: Context, raw: str | None) -> int:
    if raw is None:
        return ctx.settings.default_page_size
    if not (raw.isascii() and raw.isdigit()) or int(raw) == 0:
        raise InvalidError("_count must be a positive integer")
    return min(int(raw), ctx.settings.max_page_size)


def _time_window(stmt: Any, params: dict[str, str]) -> Any:
    for name in ("_since", "_at"):
        if name in params:
            span = date_range(params[name])
            if span is None:
                raise InvalidError(f"{name} must be a FHIR instant, e.g. 2024-03-01T10:00:00Z")
            stmt = stmt.where(H.c.last_updated >= span[0]) if name == "_since" else \
                stmt.where(H.c.last_updated <= span[1])
    return stmt


def _cursor_values(cursor: str) -> list[Any]:
    """(lastUpdated, type, id, version) of the last entry served; a client could have
    edited them into values the database refuses to compare, so they are checked."""
    values, _ = search_sql.decode_cursor(cursor, len(_KEYS))
    shapes = (int, str, str, int)
    if not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(values, shapes,
                                                                             strict=True)):
        raise InvalidError("Malformed paging cursor")
    return values


def _before(values: list[Any]) -> Any:
    ors = []
    for i, key in enumerate(_KEYS):
        equal = [k == v for k, v in zip(_KEYS[:i], values[:i], strict=True)]
        ors.append(and_(*equal, key < values[i]))
    return or_(*ors)


def _url(base: str, pairs: list[tuple[str, str]]) -> str:
    return f"{base}?{urlencode(pairs)}" if pairs else base


def _recreations(conn: Any, rows: list[Any]) -> set[Any]:
    """The PUT versions that followed a delete: the client was answered 201 Created."""
    puts = [r for r in rows if r.method == "PUT" and r.version > 1 and not r.deleted]
    if not puts:
        return set()
    after_delete = set(conn.execute(
        select(H.c.res_type, H.c.res_id, H.c.version).where(
            H.c.deleted.is_(True),
            tuple_(H.c.res_type, H.c.res_id, H.c.version).in_(
                [(r.res_type, r.res_id, r.version - 1) for r in puts]))))
    return {r for r in puts if (r.res_type, r.res_id, r.version - 1) in after_delete}


def _entry(ctx: Context, row: Any, recreated: bool = False) -> dict[str, Any]:
    url = f"{row.res_type}/{row.res_id}"
    entry: dict[str, Any] = {"fullUrl": ctx.url(row.res_type, row.res_id)}
    if not row.deleted:
        entry["resource"] = jsonio.loads_trusted(row.content)
    entry["request"] = {"method": row.method, "url": url if row.method != "POST" else row.res_type}
    created = row.version == 1 or recreated
    status = "201 Created" if created else STATUS.get(row.method, "200 OK")
    entry["response"] = {"status": status, "etag": f'W/"{row.version}"',
                         "lastModified": format_instant(row.last_updated)}
    return entry
