"""Translate parsed search criteria into SQL over the search-index tables.

Each criterion becomes an EXISTS over its index table (NOT EXISTS for `:not` and
`:missing=true`); criteria are AND'ed, values within one are OR'ed. The most selective
criterion, when selective enough, instead drives the search as a set of ids; when none
is, a page sorted by _lastUpdated walks one criterion's index rows in that order (a
token code, a reference), or else the resources themselves. Paging is by keyset: the
cursor holds the sort values of the last row served, so pages stay correct while other
clients write.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    String,
    Table,
    and_,
    exists,
    false,
    func,
    not_,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Alias, Join

from gateway.errors import InvalidError
from gateway.store.schema import INDEX_TABLES, resources, sp_reference, sp_token
from gateway.store.search_match import (
    is_local,
    local_reference,
    range_match,
    token_match,
    value_match,
)
from gateway.store.search_params import params_for
from gateway.store.search_query import (
    Criterion,
    RangeValue,
    RefValue,
    SearchQuery,
    TokenValue,
)

R = resources


def _owned(table: Any, outer: Any, param: str) -> ColumnElement[bool]:
    return and_(table.c.res_type == outer.c.res_type, table.c.res_id == outer.c.res_id,
                table.c.param == param)


# -- criteria as conditions on a resources row -----------------------------------------
class _PerResource(Alias):
    """An index table read through its (res_type, res_id) index. These lookups test one
    resource at a time; without statistics SQLite would rather scan a covering index by
    parameter for every row tested, thousands of times slower at 100k resources."""

    inherit_cache = True


@compiles(_PerResource)
def _per_resource_sql(element: Any, compiler: Any, **kw: Any) -> str:
    return str(compiler.visit_alias(element, **kw))


@compiles(_PerResource, "sqlite")
def _per_resource_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    text = str(compiler.visit_alias(element, **kw))
    return f"{text} INDEXED BY ix_{element.element.name}_resource" if kw.get("asfrom") else text


def _per_resource(table: Table, name: str | None = None) -> Any:
    return _PerResource._construct(table, name=name or f"m_{table.name}")


def criterion_sql(c: Criterion, outer: Any = R, base: str | None = None) -> ColumnElement[bool]:
    """A boolean SQL condition on `outer` (a resources alias) for one criterion; `base` is
    the server's base URL, under which absolute references count as local."""
    if c.name == "_id":
        if c.modifier == "missing":
            return false() if c.values[0] else true()
        cond = outer.c.res_id.in_([str(v) for v in c.values])
        return not_(cond) if c.modifier == "not" else cond
    if c.name == "_lastUpdated":
        col = outer.c.last_updated
        return or_(*(range_match(col, col, v, is_date=True) for v in c.values
                     if isinstance(v, RangeValue)))
    if c.has is not None:
        return _has_sql(c, outer, base)
    if c.chain is not None:
        return _chain_sql(c, outer, base)
    table, param = _index_of(c)
    t = _per_resource(table)
    owned = _owned(t, outer, param)
    if c.modifier == "missing":
        present = exists().where(owned)
        return not_(present) if c.values[0] else present
    if c.modifier == "not":  # none of the resource's values match (missing ones do)
        return not_(exists().where(owned, _values_match(c, t, None, base)))
    return exists().where(owned, _values_match(c, t, c.modifier, base))


def _index_of(c: Criterion) -> tuple[Table, str]:
    """The index table and parameter name holding a criterion's values."""
    if c.type == "reference" and c.modifier == "identifier":
        return sp_token, f"{c.name}:identifier"
    return INDEX_TABLES[c.type], c.name


def _values_match(c: Criterion, t: Any, modifier: str | None,
                  base: str | None) -> ColumnElement[bool]:
    if c.type == "reference" and c.modifier == "identifier":
        return or_(*(token_match(t, v) for v in c.values if isinstance(v, TokenValue)))
    return or_(*(value_match(c.type, t, modifier, v, base) for v in c.values))


def _chain_sql(c: Criterion, outer: Any, base: str | None) -> ColumnElement[bool]:
    assert c.chain is not None
    target_type, inner = c.chain
    target = R.alias("chain_target")
    ref = _per_resource(sp_reference, "chain_ref")
    return exists().where(
        _owned(ref, outer, c.name), ref.c.target_type == target_type,
        local_reference(ref, base),
        target.c.res_type == target_type, target.c.res_id == ref.c.target_id,
        target.c.deleted.is_(False), criterion_sql(inner, target, base))


def _has_sql(c: Criterion, outer: Any, base: str | None) -> ColumnElement[bool]:
    assert c.has is not None
    source_type, ref_param, inner = c.has
    source = R.alias("has_source")
    ref = sp_reference.alias("has_ref")
    return exists().where(
        ref.c.res_type == source_type, ref.c.param == ref_param,
        ref.c.target_type == outer.c.res_type, ref.c.target_id == outer.c.res_id,
        local_reference(ref, base), source.c.res_type == source_type,
        source.c.res_id == ref.c.res_id, source.c.deleted.is_(False),
        criterion_sql(inner, source, base))


# -- criteria as sets of ids: the most selective one drives the search ----------------
DRIVER_LIMIT = 2000
"""A criterion matching fewer resources than this drives the search: its ids are read
from the parameter index and each is checked against the other criteria. Otherwise the
search walks the resources in sort order, which soon fills a page when matches abound."""


def ids_sql(c: Criterion, resource_type: str, base: str | None) -> Select[Any] | None:
    """The ids of `resource_type` resources a positive criterion matches (deleted ones
    may be among them), or None when the criterion cannot be read as a set."""
    if c.name == "_id":
        if c.modifier is not None:
            return None
        r = R.alias("d_id")
        return select(r.c.res_id).where(r.c.res_type == resource_type,
                                        r.c.res_id.in_([str(v) for v in c.values]))
    if c.chain is not None:
        return _chain_ids(c, resource_type, base)
    if c.has is not None:
        return _has_ids(c, resource_type, base)
    if c.type not in INDEX_TABLES or c.modifier in ("missing", "not"):
        return None
    table, param = _index_of(c)
    t = table.alias(f"d_{table.name}")
    return select(t.c.res_id).where(t.c.res_type == resource_type, t.c.param == param,
                                    _values_match(c, t, c.modifier, base))


def _live(resource_type: str, ids: Select[Any], name: str) -> Select[Any]:
    r = R.alias(name)
    return select(r.c.res_id).where(r.c.res_type == resource_type, r.c.deleted.is_(False),
                                    r.c.res_id.in_(ids))


def _chain_ids(c: Criterion, resource_type: str, base: str | None) -> Select[Any] | None:
    assert c.chain is not None
    target_type, inner = c.chain
    targets = ids_sql(inner, target_type, base)
    if targets is None:
        return None
    ref = sp_reference.alias("d_chain")
    return select(ref.c.res_id).where(
        ref.c.res_type == resource_type, ref.c.param == c.name,
        ref.c.target_type == target_type, local_reference(ref, base),
        ref.c.target_id.in_(_live(target_type, targets, "d_chain_target")))


def _has_ids(c: Criterion, resource_type: str, base: str | None) -> Select[Any] | None:
    assert c.has is not None
    source_type, ref_param, inner = c.has
    sources = ids_sql(inner, source_type, base)
    if sources is None:
        return None
    ref = sp_reference.alias("d_has")
    return select(ref.c.target_id.label("res_id")).where(
        ref.c.res_type == source_type, ref.c.param == ref_param,
        ref.c.target_type == resource_type, local_reference(ref, base),
        ref.c.res_id.in_(_live(source_type, sources, "d_has_source")))


SORTED_DRIVER_LIMIT = 50_000
"""The same bound when every match is read anyway (sorting by a search parameter, which
no index orders, or counting the matches): reading them from the smallest criterion is
cheaper than walking every resource."""


def choose_driver(conn: Connection, query: SearchQuery, counting: bool = False) -> int | None:
    """The index of the criterion with the fewest matches, when it has few enough to
    drive the search; counting stops at the limit, so each probe stays cheap.
    `counting`: the driver of a count of every match, not of one page."""
    if query.resource_type is None:
        return None
    by_param = bool(query.sort) and query.sort[0][0] not in ("_id", "_lastUpdated")
    limit = SORTED_DRIVER_LIMIT if by_param or counting else DRIVER_LIMIT
    best: tuple[int, int] | None = None
    for i, c in enumerate(query.criteria):
        # Counted without the base-URL test of references: an estimate is enough here,
        # and that test reads every row where the index alone answers the count.
        ids = ids_sql(c, query.resource_type, None)
        if ids is None:
            continue
        found = len(c.values) if c.name == "_id" else _count_up_to(conn, ids, limit)
        if found < limit and (best is None or found < best[1]):
            best = (i, found)
        if found == 0:
            break
    return None if best is None else best[0]


def _count_up_to(conn: Connection, ids: Select[Any], limit: int) -> int:
    """How many ids a criterion matches, counting no further than `limit`: each probe
    stays cheap however many it matches."""
    probe = select(func.count()).select_from(ids.limit(limit).subquery())
    return int(conn.execute(probe).scalar_one())


class _Distinct(FunctionElement[str]):
    """A column deduplicated without help from an index ordered by it (`+col` on SQLite),
    so that SQLite reads the rows through the index that matches the criterion."""

    inherit_cache = True
    type = String()


@compiles(_Distinct)
def _distinct_sql(element: Any, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_Distinct, "sqlite")
def _distinct_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.clauses, **kw))


class _Ordered(Join):
    """A join SQLite must run left to right (CROSS JOIN): from the driving ids to the
    resources, rather than through every resource in sort order."""

    inherit_cache = True


@compiles(_Ordered)
def _ordered_sql(element: Any, compiler: Any, **kw: Any) -> str:
    return str(compiler.visit_join(element, **kw))


@compiles(_Ordered, "sqlite")
def _ordered_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    kw.pop("asfrom", None)
    left = element.left._compiler_dispatch(compiler, asfrom=True, **kw)
    right = element.right._compiler_dispatch(compiler, asfrom=True, **kw)
    return f"{left} CROSS JOIN {right} ON {element.onclause._compiler_dispatch(compiler, **kw)}"


# -- walking one criterion's matches in _lastUpdated order -----------------------------
WALK_PROBE_LIMIT = 20_000
"""Walkable criteria are counted up to this many matches to choose the one to walk."""


@dataclass(frozen=True)
class Walk:
    """A page read by walking one criterion's index rows in lastUpdated order, each row
    joined to its resource and tested against the other criteria, until the page is
    full. The token and reference indexes keep, within one value, their rows in that
    order: at 1M Tasks, `status=ready&owner=…` reads ~120 rows of the owner's instead of
    ~12,000 Tasks."""

    criterion: int
    dialect: str


def _walkable(c: Criterion, base: str | None) -> bool:
    """One token code (with or without its system), or one local reference to type/id:
    what the (type, param, value…, last_updated) indexes hold in order."""
    if c.chain or c.has or c.modifier is not None or len(c.values) != 1:
        return False
    v = c.values[0]
    if c.type == "token":
        return isinstance(v, TokenValue) and v.code is not None
    if c.type == "reference" and isinstance(v, RefValue):
        return bool(v.type) and is_local(v, base)
    return False


def _sorted_by_last_updated(query: SearchQuery) -> bool:
    return not query.sort or list(query.sort) == [("_lastUpdated", False)]


def choose_walk(conn: Connection, query: SearchQuery, driver: int | None) -> Walk | None:
    """How a page sorted by _lastUpdated ascending (the default) is read, if by a walk.

    A criterion small enough to drive the page (`driver`) is walked instead when it can
    be: the walk stops once the page is full, where driving reads, checks and sorts every
    match. With no driver, a walkable reference is walked rather than a token, and among
    several of a kind the one with the fewest matches. Descending pages keep to the
    resources' own index: their tie-break on id runs the other way."""
    if query.resource_type is None or not _sorted_by_last_updated(query):
        return None
    walkable = [i for i, c in enumerate(query.criteria) if _walkable(c, query.base_url)]
    if driver is not None:
        return Walk(driver, conn.dialect.name) if driver in walkable else None
    # Every criterion has thousands of matches here. A reference (one owner, one patient)
    # is walked before a token (a status, a code): it usually has the fewer, and counting
    # a status's matches at 1M Tasks would cost more than the walk it decides. Within the
    # kind, each is counted only as far as the smallest so far.
    references = [i for i in walkable if query.criteria[i].type == "reference"]
    candidates = references or walkable
    if not candidates:
        return None
    best, fewest = candidates[0], WALK_PROBE_LIMIT + 1
    for i in candidates if len(candidates) > 1 else ():
        ids = ids_sql(query.criteria[i], query.resource_type, None)
        assert ids is not None
        found = _count_up_to(conn, ids, fewest)
        if found < fewest:
            best, fewest = i, found
    return Walk(best, conn.dialect.name)


def _walked(query: SearchQuery, walk: Walk) -> tuple[Any, list[ColumnElement[bool]], Any]:
    """FROM clause, WHERE conditions and the walked index alias of a walked page."""
    assert query.resource_type is not None
    c = query.criteria[walk.criterion]
    table, param = _index_of(c)
    w = table.alias("w")
    conds: list[ColumnElement[bool]] = [
        w.c.res_type == query.resource_type, w.c.param == param,
        _values_match(c, w, None, query.base_url),
        R.c.deleted.is_(False)]
    conds.extend(criterion_sql(other, R, query.base_url)
                 for i, other in enumerate(query.criteria) if i != walk.criterion)
    joined = _Ordered(w, R, and_(R.c.res_type == query.resource_type,
                                 R.c.res_id == w.c.res_id))
    return joined, conds, w


def _source(query: SearchQuery, driver: int | None) -> tuple[Any, list[ColumnElement[bool]]]:
    """FROM clause and WHERE conditions of the resources a search matches."""
    conds: list[ColumnElement[bool]] = [R.c.deleted.is_(False)]
    if query.resource_type is not None:
        conds.append(R.c.res_type == query.resource_type)
    conds.extend(criterion_sql(c, R, query.base_url) for i, c in enumerate(query.criteria)
                 if i != driver)
    if driver is None or query.resource_type is None:
        return R, conds
    ids = ids_sql(query.criteria[driver], query.resource_type, query.base_url)
    assert ids is not None
    inner = ids.subquery("d_ids")
    driving = select(_Distinct(inner.c.res_id).label("res_id")).distinct().subquery("d")
    joined = _Ordered(driving, R, and_(R.c.res_type == query.resource_type,
                                       R.c.res_id == driving.c.res_id))
    return joined, conds


def matches(query: SearchQuery) -> list[ColumnElement[bool]]:
    """Conditions on the resources table alone (for callers that need no driver)."""
    return _source(query, None)[1]


# -- sorting and keyset paging -------------------------------------------------------
_SORT_COLUMN = {"string": "value", "token": "code", "date": None, "number": "value",
                "quantity": "value", "uri": "value"}


def _sort_expression(resource_type: str | None, name: str, desc: bool) -> Any:
    if name == "_id":
        return R.c.res_id
    if name == "_lastUpdated" or resource_type is None:
        return R.c.last_updated
    param = params_for(resource_type)[name]
    table = _per_resource(INDEX_TABLES[param.type], f"sort_{name.replace('-', '_')}")
    column = _SORT_COLUMN[param.type] or ("high" if desc else "low")
    agg = func.max if desc else func.min
    return (select(agg(table.c[column])).where(_owned(table, R, param.code))
            .scalar_subquery())


def sort_keys(query: SearchQuery) -> list[tuple[Any, bool]]:
    keys = [(_sort_expression(query.resource_type, name, desc), desc)
            for name, desc in (query.sort or [("_lastUpdated", False)])]
    if query.resource_type is None:
        keys.append((R.c.res_type, False))
    keys.append((R.c.res_id, False))
    return keys


def _after(keys: list[tuple[Any, bool]], values: list[Any], backwards: bool) -> ColumnElement[bool]:
    """Rows strictly after (or before) the cursor in sort order, NULLs sorting last."""
    ors = []
    for i, (expr, desc) in enumerate(keys):
        equal = [(k.is_(None) if v is None else k == v)
                 for (k, _), v in zip(keys[:i], values[:i], strict=True)]
        v = values[i]
        greater = desc == backwards  # ascending and forward, or descending and backward
        beyond = None if v is None else (expr > v if greater else expr < v)
        if not backwards:
            step = false() if beyond is None else or_(beyond, expr.is_(None))
        else:
            step = expr.is_not(None) if beyond is None else beyond
        ors.append(and_(*equal, step))
    return or_(*ors)


def _after_walked(keys: list[tuple[Any, bool]], values: list[Any],
                  backwards: bool) -> ColumnElement[bool]:
    """`_after` for a walk's ascending keys that are never NULL: one row-value comparison,
    which both engines answer by seeking the walked index to the cursor."""
    columns, bounds = tuple_(*(k for k, _ in keys)), tuple_(*values)
    return columns < bounds if backwards else columns > bounds


def encode_cursor(values: list[Any], backwards: bool = False) -> str:
    raw = orjson.dumps({"v": values, "b": backwards})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, width: int) -> tuple[list[Any], bool]:
    """The sort values and direction in a cursor; anything a client could have altered
    into a value the database would choke on is rejected here, as a 400."""
    try:
        data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        values, backwards = data["v"], bool(data["b"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidError("Malformed paging cursor") from exc
    if not isinstance(values, list) or len(values) != width:
        raise InvalidError("Paging cursor does not belong to this search")
    if not all(_plain(v) for v in values):
        raise InvalidError("Malformed paging cursor")
    return values, backwards


def _plain(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, str):
        return "\x00" not in value
    return value is None or isinstance(value, float)


def _check_types(keys: list[tuple[Any, bool]], values: list[Any]) -> None:
    """Each cursor value must have its sort key's type (PostgreSQL would fail otherwise)."""
    for (expr, _), value in zip(keys, values, strict=True):
        wanted = expr.type.python_type
        ok = value is None or isinstance(value, wanted) or (
            wanted is float and isinstance(value, int))
        if not ok:
            raise InvalidError("Malformed paging cursor")


def page_statement(query: SearchQuery, driver: int | None = None, walk: Walk | None = None
                   ) -> tuple[Select[Any], list[tuple[Any, bool]], bool]:
    """SELECT of one page (count + 1 rows, to know whether a next page exists)."""
    walked: Any = None
    if walk is not None:
        source, conds, walked = _walked(query, walk)
        # The same sort values as the resources' (a cursor serves either plan), read
        # from the walked index so that its order is the page's.
        keys = [(walked.c.last_updated, False), (walked.c.res_id, False)]
    else:
        keys = sort_keys(query)
        source, conds = _source(query, driver)
    backwards = False
    if query.cursor:
        values, backwards = decode_cursor(query.cursor, len(keys))
        _check_types(keys, values)
        conds.append(_after(keys, values, backwards) if walk is None
                     else _after_walked(keys, values, backwards))
    order = []
    for expr, desc in keys:
        reverse = desc != backwards
        if walk is not None:  # keys that are never NULL, in the walked index's order
            order.append(expr.desc() if reverse else expr.asc())
            continue
        order.append(expr.desc().nulls_first() if reverse and backwards else
                     expr.desc().nulls_last() if reverse else
                     expr.asc().nulls_first() if backwards else expr.asc().nulls_last())
    columns = [R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated, R.c.content]
    sort_columns = [expr.label(f"k{i}") for i, (expr, _) in enumerate(keys)]
    stmt = (select(*columns, *sort_columns).select_from(source).where(*conds)
            .order_by(*order).limit(query.count + 1))
    if walk is not None:  # a resource with the walked value twice (two systems) once
        unique = (walked.c.last_updated, walked.c.res_id)
        stmt = (stmt.ext(distinct_on(*unique)) if walk.dialect == "postgresql"
                else stmt.group_by(*unique))
    return stmt, keys, backwards


def count_statement(query: SearchQuery, driver: int | None = None) -> Select[Any]:
    source, conds = _source(query, driver)
    return select(func.count()).select_from(source).where(*conds)


def ids_statement(query: SearchQuery, driver: int | None, limit: int) -> Select[Any]:
    """Up to `limit` ids of matches, in no particular order (conditional interactions)."""
    source, conds = _source(query, driver)
    return select(R.c.res_id).select_from(source).where(*conds).limit(limit)
