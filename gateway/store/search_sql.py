"""Translate parsed search criteria into SQL over the search-index tables.

Each criterion becomes an EXISTS over its index table (NOT EXISTS for `:not` and
`:missing=true`); criteria are AND'ed, values within one are OR'ed. Paging is by keyset:
the cursor holds the sort values of the last row served, so pages stay correct while
other clients write.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)

from gateway.errors import InvalidError
from gateway.store.indexing import normalize
from gateway.store.schema import INDEX_TABLES, resources, sp_reference, sp_token
from gateway.store.search_params import params_for
from gateway.store.search_query import Criterion, RangeValue, RefValue, SearchQuery, TokenValue

R = resources


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _owned(table: Any, outer: Any, param: str) -> ColumnElement[bool]:
    return and_(table.c.res_type == outer.c.res_type, table.c.res_id == outer.c.res_id,
                table.c.param == param)


def _token_match(t: Any, v: TokenValue) -> ColumnElement[bool]:
    conds = []
    if v.code is not None:
        conds.append(t.c.code == v.code)
    if v.system == "":
        conds.append(t.c.system.is_(None))
    elif v.system is not None:
        conds.append(t.c.system == v.system)
    return and_(true(), *conds)


def _range_match(col_low: Any, col_high: Any, v: RangeValue) -> ColumnElement[bool]:
    low, high = v.low, v.high
    match v.prefix:
        case "eq":
            return and_(col_low >= low, col_high <= high)
        case "ne":
            return not_(and_(col_low >= low, col_high <= high))
        case "gt":
            return col_high > high
        case "lt":
            return col_low < low
        case "ge":
            return col_high >= low
        case "le":
            return col_low <= high
        case "sa":
            return col_low > high
        case "eb":
            return col_high < low
        case _:  # ap: within 10% of the value's distance, at least its own range
            slack = abs(low) * 0.1
            return and_(col_low <= high + slack, col_high >= low - slack)


def _value_match(kind: str, t: Any, modifier: str | None, value: object) -> ColumnElement[bool]:
    if kind == "string":
        text = str(value)
        if modifier == "exact":
            return t.c.exact == text
        pattern = _like_escape(normalize(text))
        pattern = f"%{pattern}%" if modifier == "contains" else f"{pattern}%"
        return t.c.value.like(pattern, escape="\\")
    if kind == "token":
        if modifier == "text":
            return t.c.text.like(f"{_like_escape(normalize(str(value)))}%", escape="\\")
        assert isinstance(value, TokenValue)
        return _token_match(t, value)
    if kind == "reference":
        assert isinstance(value, RefValue)
        if value.id is None:
            return t.c.url == value.url
        cond = t.c.target_id == value.id
        return and_(cond, t.c.target_type == value.type) if value.type else cond
    if kind == "date":
        assert isinstance(value, RangeValue)
        return _range_match(t.c.low, t.c.high, value)
    if kind in ("number", "quantity"):
        assert isinstance(value, RangeValue)
        cond = _range_match(t.c.value, t.c.value, value)
        if kind == "quantity" and value.code:
            cond = and_(cond, t.c.code == value.code)
        if kind == "quantity" and value.system:
            cond = and_(cond, t.c.system == value.system)
        return cond
    if kind == "uri":
        text = str(value)
        if modifier == "below":
            return t.c.value.like(f"{_like_escape(text)}%", escape="\\")
        if modifier == "above":
            return literal(text).like(t.c.value + "%")
        return t.c.value == text
    raise InvalidError(f"Unsupported parameter type {kind}")


def criterion_sql(c: Criterion, outer: Any = R) -> ColumnElement[bool]:
    """A boolean SQL condition on `outer` (a resources alias) for one criterion."""
    if c.name == "_id":
        if c.modifier == "missing":
            return false() if c.values[0] else true()
        cond = outer.c.res_id.in_([str(v) for v in c.values])
        return not_(cond) if c.modifier == "not" else cond
    if c.name == "_lastUpdated":
        col = outer.c.last_updated
        return or_(*(_range_match(col, col, v) for v in c.values if isinstance(v, RangeValue)))
    if c.has is not None:
        return _has_sql(c, outer)
    if c.chain is not None:
        return _chain_sql(c, outer)
    table = INDEX_TABLES[c.type]
    if c.type == "reference" and c.modifier == "identifier":
        table = sp_token
        owned = _owned(table, outer, f"{c.name}:identifier")
        return exists().where(owned, or_(*(_token_match(table, v) for v in c.values
                                           if isinstance(v, TokenValue))))
    owned = _owned(table, outer, c.name)
    if c.modifier == "missing":
        present = exists().where(owned)
        return not_(present) if c.values[0] else present
    if c.modifier == "not":  # none of the resource's values match (missing ones do)
        return not_(exists().where(owned, or_(*(_value_match(c.type, table, None, v)
                                                 for v in c.values))))
    return exists().where(owned, or_(*(_value_match(c.type, table, c.modifier, v)
                                       for v in c.values)))


def _chain_sql(c: Criterion, outer: Any) -> ColumnElement[bool]:
    assert c.chain is not None
    target_type, inner = c.chain
    target = R.alias("chain_target")
    ref = sp_reference.alias("chain_ref")
    return exists().where(
        _owned(ref, outer, c.name), ref.c.target_type == target_type,
        target.c.res_type == target_type, target.c.res_id == ref.c.target_id,
        target.c.deleted.is_(False), criterion_sql(inner, target))


def _has_sql(c: Criterion, outer: Any) -> ColumnElement[bool]:
    assert c.has is not None
    source_type, ref_param, inner = c.has
    source = R.alias("has_source")
    ref = sp_reference.alias("has_ref")
    return exists().where(
        ref.c.res_type == source_type, ref.c.param == ref_param,
        ref.c.target_type == outer.c.res_type, ref.c.target_id == outer.c.res_id,
        source.c.res_type == source_type, source.c.res_id == ref.c.res_id,
        source.c.deleted.is_(False), criterion_sql(inner, source))


# -- sorting and keyset paging -------------------------------------------------------
_SORT_COLUMN = {"string": "value", "token": "code", "date": None, "number": "value",
                "quantity": "value", "uri": "value"}


def _sort_expression(resource_type: str | None, name: str, desc: bool) -> Any:
    if name == "_id":
        return R.c.res_id
    if name == "_lastUpdated" or resource_type is None:
        return R.c.last_updated
    param = params_for(resource_type)[name]
    table = INDEX_TABLES[param.type].alias(f"sort_{name.replace('-', '_')}")
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


def encode_cursor(values: list[Any], backwards: bool = False) -> str:
    raw = orjson.dumps({"v": values, "b": backwards})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, width: int) -> tuple[list[Any], bool]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        values, backwards = data["v"], bool(data["b"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidError("Malformed paging cursor") from exc
    if not isinstance(values, list) or len(values) != width:
        raise InvalidError("Paging cursor does not belong to this search")
    return values, backwards


def matches(query: SearchQuery) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = [R.c.deleted.is_(False)]
    if query.resource_type is not None:
        conds.append(R.c.res_type == query.resource_type)
    conds.extend(criterion_sql(c) for c in query.criteria)
    return conds


def page_statement(query: SearchQuery) -> tuple[Select[Any], list[tuple[Any, bool]], bool]:
    """SELECT of one page (count + 1 rows, to know whether a next page exists)."""
    keys = sort_keys(query)
    conds = matches(query)
    backwards = False
    if query.cursor:
        values, backwards = decode_cursor(query.cursor, len(keys))
        conds.append(_after(keys, values, backwards))
    order = []
    for expr, desc in keys:
        reverse = desc != backwards
        order.append(expr.desc().nulls_first() if reverse and backwards else
                     expr.desc().nulls_last() if reverse else
                     expr.asc().nulls_first() if backwards else expr.asc().nulls_last())
    columns = [R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated, R.c.content]
    sort_columns = [expr.label(f"k{i}") for i, (expr, _) in enumerate(keys)]
    stmt = select(*columns, *sort_columns).where(*conds).order_by(*order).limit(query.count + 1)
    return stmt, keys, backwards


def count_statement(query: SearchQuery) -> Select[Any]:
    return select(func.count()).select_from(R).where(*matches(query))
