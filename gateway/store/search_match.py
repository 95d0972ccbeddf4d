"""How one search value matches a row of a search-index table, per parameter type.

The prefix, modifier and precision rules of https://hl7.org/fhir/R4/search.html, as
SQL conditions on an index-table alias `t`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, not_, or_, true

from gateway.errors import InvalidError
from gateway.store.indexing import normalize
from gateway.store.search_query import RangeValue, RefValue, TokenValue
from gateway.store.timeparse import now_micros


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def token_match(t: Any, v: TokenValue) -> ColumnElement[bool]:
    conds = []
    if v.code is not None:
        conds.append(t.c.code == v.code)
    if v.system == "":
        conds.append(t.c.system.is_(None))
    elif v.system is not None:
        conds.append(t.c.system == v.system)
    return and_(true(), *conds)


def range_match(col_low: Any, col_high: Any, v: RangeValue,
                 is_date: bool = False) -> ColumnElement[bool]:
    """The prefix semantics of https://hl7.org/fhir/R4/search.html#prefix on ranges."""
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
        case _:  # ap: the spec recommends 10% of the value, of its gap to now for dates
            slack = abs((now_micros() if is_date else 0) - low) * 0.1
            return and_(col_low <= high + slack, col_high >= low - slack)


def local_reference(t: Any, base: str | None) -> ColumnElement[bool]:
    """A relative reference, or an absolute one on our own base."""
    if base is None:
        return true()
    return or_(t.c.url.is_(None), t.c.url.like(like_escape(base) + "/%", escape="\\"))


def is_local(v: RefValue, base: str | None) -> bool:
    """A searched reference by type/id: relative, or absolute on our own base."""
    return v.id is not None and (
        v.url is None or (base is not None and v.url.startswith(base + "/")))


def _reference_match(t: Any, v: RefValue, base: str | None) -> ColumnElement[bool]:
    if not is_local(v, base):
        return t.c.url == v.url
    cond = t.c.target_id == v.id
    if v.type:
        cond = and_(cond, t.c.target_type == v.type)
    return and_(cond, local_reference(t, base))


def _uri_match(t: Any, modifier: str | None, text: str) -> ColumnElement[bool]:
    if modifier == "below":  # the URL itself or anything under it, by path segment
        stem = text.rstrip("/")
        return or_(t.c.value == text, t.c.value.like(like_escape(stem) + "/%", escape="\\"))
    if modifier == "above":  # the URL itself or any of its parent paths
        return t.c.value.in_(_parents(text))
    return t.c.value == text


def _parents(url: str) -> list[str]:
    """`http://a.org/x/y` → itself, `http://a.org/x`, `http://a.org`."""
    scheme, sep, rest = url.partition("://")
    head, parts = (scheme + sep, rest.split("/")) if sep else ("", url.split("/"))
    return [head + "/".join(parts[:n]) for n in range(len(parts), 0, -1) if parts[n - 1]]


def value_match(kind: str, t: Any, modifier: str | None, value: object,
                 base: str | None) -> ColumnElement[bool]:
    if kind == "string":
        text = str(value)
        if modifier == "exact":
            return t.c.exact == text
        pattern = like_escape(normalize(text))
        pattern = f"%{pattern}%" if modifier == "contains" else f"{pattern}%"
        return t.c.value.like(pattern, escape="\\")
    if kind == "token":
        if modifier == "text":
            return t.c.text.like(f"{like_escape(normalize(str(value)))}%", escape="\\")
        assert isinstance(value, TokenValue)
        return token_match(t, value)
    if kind == "reference":
        assert isinstance(value, RefValue)
        return _reference_match(t, value, base)
    if kind == "date":
        assert isinstance(value, RangeValue)
        return range_match(t.c.low, t.c.high, value, is_date=True)
    if kind in ("number", "quantity"):
        assert isinstance(value, RangeValue)
        cond = range_match(t.c.value, t.c.value, value)
        if kind == "quantity" and value.code:
            cond = and_(cond, t.c.code == value.code)
        if kind == "quantity" and value.system:
            cond = and_(cond, t.c.system == value.system)
        return cond
    if kind == "uri":
        return _uri_match(t, modifier, str(value))
    raise InvalidError(f"Unsupported parameter type {kind}")
