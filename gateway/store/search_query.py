"""Parse a FHIR search query string into typed criteria and result controls.

Pure: no database. See https://hl7.org/fhir/R4/search.html. Unknown or malformed
parameters are errors unless the client asked for `Prefer: handling=lenient`, in which
case they are dropped and reported back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from gateway.errors import InvalidError, Issue, NotSupportedError
from gateway.fhir import is_resource_type
from gateway.store.search_params import SearchParam, params_for
from gateway.store.timeparse import date_range

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"not", "missing", "text"},
    "reference": {"missing", "identifier"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"missing", "below", "above"},
}
RESULT_PARAMS = {"_count", "_sort", "_include", "_revinclude", "_summary", "_elements",
                 "_total", "_totalMethod", "_format", "_pretty", "_cursor", "_include:iterate",
                 "_revinclude:iterate"}
UNSUPPORTED = {"_text", "_content", "_filter", "_query", "_list", "_contained",
               "_containedType", "_type"}
SUMMARY = {"true", "false", "text", "data", "count"}
TOTAL = {"none", "estimate", "accurate"}


@dataclass(frozen=True)
class Criterion:
    """One search parameter with its values (OR'ed); several Criteria are AND'ed."""

    name: str
    type: str  # string | token | reference | date | number | quantity | uri | special
    modifier: str | None
    values: tuple[object, ...]
    chain: tuple[str, Criterion] | None = None     # (target type, criterion on target)
    has: tuple[str, str, Criterion] | None = None  # (source type, reference param, criterion)


@dataclass(frozen=True)
class TokenValue:
    system: str | None  # None: any system; "": no system
    code: str | None    # None: any code in the system


@dataclass(frozen=True)
class RangeValue:
    prefix: str
    low: float
    high: float
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class RefValue:
    type: str | None
    id: str | None
    url: str | None = None


@dataclass(frozen=True)
class Include:
    source: str
    param: str
    target: str | None
    iterate: bool


@dataclass
class SearchQuery:
    resource_type: str | None
    criteria: list[Criterion] = field(default_factory=list)
    count: int = 20
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    summary: str | None = None
    elements: list[str] = field(default_factory=list)
    total: str | None = None
    cursor: str | None = None
    base_url: str | None = None  # absolute references on this base are local ones
    ignored: list[Issue] = field(default_factory=list)
    raw: list[tuple[str, str]] = field(default_factory=list)  # what the links repeat


def _split_values(raw: str) -> list[str]:
    """Comma-separated values; `\\,` is a literal comma. Other escapes (`\\|`, `\\$`,
    `\\\\`) are kept for the type's own parser, which knows where `|` separates parts."""
    out, current, escaped = [], [], False
    for ch in raw:
        if escaped:
            current.append(ch if ch == "," else "\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        current.append("\\")
    out.append("".join(current))
    return out


def _unescape(raw: str) -> str:
    """Drop the backslash of `\\|`, `\\$` and `\\\\` in a value that has no parts."""
    out, i = [], 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            i += 1
        out.append(raw[i])
        i += 1
    return "".join(out)


def _split_pipe(raw: str) -> list[str]:
    parts, current, i = [], [], 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            current.append(raw[i + 1])
            i += 2
            continue
        if raw[i] == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(raw[i])
        i += 1
    parts.append("".join(current))
    return parts


def _prefix(raw: str) -> tuple[str, str]:
    if raw[:2] in PREFIXES and len(raw) > 2 and not raw[2].isalpha():
        return raw[:2], raw[2:]
    return "eq", raw


def parse_token(raw: str) -> TokenValue:
    parts = _split_pipe(raw)
    if len(parts) == 1:
        return TokenValue(None, parts[0])
    if len(parts) == 2:
        return TokenValue(parts[0], parts[1] or None)
    raise InvalidError(f"Malformed token '{raw}'")


def parse_date(raw: str) -> RangeValue:
    prefix, text = _prefix(raw)
    # An unencoded `+` of a zone offset arrives as a space: take it back.
    span = date_range(text.replace(" ", "+"))
    if span is None:
        raise InvalidError(f"Malformed date '{raw}': expected e.g. 2024-03-01 or ge2024-03")
    return RangeValue(prefix, span[0], span[1])


def _decimal_bounds(text: str) -> tuple[float, float, float]:
    """The value and the range its precision implies: 100 is [99.5, 100.5], 100.0 is
    [99.95, 100.05], and in exponent form 1e2 is [95, 105] (the specification's own
    example: https://hl7.org/fhir/R4/search.html#number)."""
    try:
        number = Decimal(text)
    except InvalidOperation as exc:
        raise InvalidError(f"Malformed number '{text}'") from exc
    # Beyond what a double holds the index cannot compare: refuse rather than overflow.
    if not number.is_finite() or not -300 <= number.adjusted() <= 300:
        raise InvalidError(f"Malformed number '{text}'")
    exponent = int(number.as_tuple().exponent)
    if "e" in text.lower():  # the last written digit's place, one further
        exponent = number.adjusted() - len(number.as_tuple().digits)
    half = Decimal(5).scaleb(max(exponent, -330) - 1)
    return float(number), float(number - half), float(number + half)


def parse_number(raw: str) -> RangeValue:
    prefix, text = _prefix(raw)
    value, low, high = _decimal_bounds(text)
    if prefix in ("eq", "ne"):
        return RangeValue(prefix, low, high)
    return RangeValue(prefix, value, value)


def parse_quantity(raw: str) -> RangeValue:
    parts = _split_pipe(raw)
    if len(parts) not in (1, 3):
        raise InvalidError(f"Malformed quantity '{raw}': expected [prefix]number|system|code")
    number = parse_number(parts[0])
    system, code = (parts[1] or None, parts[2] or None) if len(parts) == 3 else (None, None)
    return RangeValue(number.prefix, number.low, number.high, system, code)


def parse_reference(raw: str, targets: tuple[str, ...], type_modifier: str | None) -> RefValue:
    """Type/id, a bare id, or an absolute URL (matched as local when on our base)."""
    raw = _unescape(raw)
    if "://" in raw or raw.startswith("urn:"):
        tail = raw.split("/_history/")[0].rstrip("/").split("/")
        if len(tail) >= 2 and is_resource_type(tail[-2]):
            return RefValue(tail[-2], tail[-1], raw.split("/_history/")[0])
        return RefValue(None, None, raw)
    parts = raw.split("/_history/")[0].split("/")
    if len(parts) == 2:
        if not is_resource_type(parts[0]):
            raise InvalidError(f"Unknown resource type in reference '{raw}'")
        return RefValue(parts[0], parts[1])
    if len(parts) == 1 and parts[0]:
        only = targets[0] if len(targets) == 1 else None
        return RefValue(type_modifier or only, parts[0])
    raise InvalidError(f"Malformed reference '{raw}'")


def _values(param: SearchParam, modifier: str | None, raw: str) -> tuple[object, ...]:
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise InvalidError(f"{param.code}:missing takes true or false")
        return (raw == "true",)
    items = _split_values(raw)
    if param.type == "token" and modifier != "text":
        return tuple(parse_token(v) for v in items)
    if param.type == "token" or param.type in ("string", "uri"):
        return tuple(_unescape(v) for v in items)
    if param.type == "reference" and modifier == "identifier":
        return tuple(parse_token(v) for v in items)
    if param.type == "reference":
        type_mod = modifier if modifier and is_resource_type(modifier) else None
        return tuple(parse_reference(v, param.targets, type_mod) for v in items)
    if param.type == "date":
        return tuple(parse_date(v) for v in items)
    if param.type == "number":
        return tuple(parse_number(v) for v in items)
    if param.type == "quantity":
        return tuple(parse_quantity(v) for v in items)
    raise InvalidError(f"Search parameter '{param.code}' has an unsupported type {param.type}")


def _check_modifier(param: SearchParam, modifier: str | None) -> None:
    if modifier is None:
        return
    if param.type == "reference" and is_resource_type(modifier):
        if param.targets and modifier not in param.targets:
            raise InvalidError(f"{param.code} cannot refer to {modifier}")
        return
    if modifier not in MODIFIERS.get(param.type, set()):
        raise NotSupportedError(f"Modifier :{modifier} is not supported on {param.code} "
                                f"({param.type})")


def parse_criterion(resource_type: str, name: str, raw: str, depth: int = 0) -> Criterion:
    """One `name[:modifier][.chain]=value` against a resource type."""
    if name.startswith("_has:"):
        return _parse_has(resource_type, name, raw, depth)
    base, _, chain = name.partition(".")
    code, _, modifier = base.partition(":")
    modifier_or_none = modifier or None
    if code == "_id":
        if modifier_or_none not in (None, "missing", "not"):
            raise NotSupportedError(f"Modifier :{modifier} is not supported on _id")
        return Criterion("_id", "special", modifier_or_none,
                         (raw == "true",) if modifier == "missing" else
                         tuple(_unescape(v) for v in _split_values(raw)))
    if code == "_lastUpdated":
        if modifier_or_none:
            raise NotSupportedError(f"Modifier :{modifier} is not supported on _lastUpdated")
        return Criterion("_lastUpdated", "special", None,
                         tuple(parse_date(v) for v in _split_values(raw)))
    param = params_for(resource_type).get(code)
    if param is None:
        raise InvalidError(f"Unknown search parameter '{code}' for {resource_type}")
    if chain:
        return _parse_chain(resource_type, param, modifier_or_none, chain, raw, depth)
    _check_modifier(param, modifier_or_none)
    if raw == "":
        raise InvalidError(f"Search parameter '{name}' has no value")
    return Criterion(code, param.type, modifier_or_none, _values(param, modifier_or_none, raw))


def _parse_chain(resource_type: str, param: SearchParam, modifier: str | None, chain: str,
                 raw: str, depth: int) -> Criterion:
    if param.type != "reference":
        raise InvalidError(f"'{param.code}' is not a reference: it cannot be chained")
    if depth >= 1 or "." in chain:
        raise NotSupportedError(f"Chain '{param.code}.{chain}' has more than one level: "
                                "only one level of chaining is supported")
    if modifier is not None and (not is_resource_type(modifier) or modifier not in param.targets):
        raise InvalidError(f"'{param.code}' cannot refer to {modifier}")
    inner_code = chain.split(":")[0]
    targets = [modifier] if modifier else [t for t in param.targets if is_resource_type(t)]
    candidates = [t for t in targets if inner_code in params_for(t)]
    if not candidates:
        raise InvalidError(f"No target type of '{param.code}' has a search parameter "
                           f"'{inner_code}'")
    if len(candidates) > 1:
        raise InvalidError(f"Chain '{param.code}.{chain}' is ambiguous: name the target "
                           f"type ({', '.join(candidates)}), "
                           f"e.g. {param.code}:{candidates[0]}.{chain}")
    inner = parse_criterion(candidates[0], chain, raw, depth + 1)
    return Criterion(param.code, "reference", None, (), chain=(candidates[0], inner))


def _parse_has(resource_type: str, name: str, raw: str, depth: int) -> Criterion:
    parts = name.split(":", 3)
    if len(parts) != 4 or not is_resource_type(parts[1]) or depth >= 1:
        raise InvalidError(f"Malformed _has '{name}': expected _has:Type:reference:param")
    _, source, ref_param, inner_name = parts
    ref = params_for(source).get(ref_param)
    if ref is None or ref.type != "reference":
        raise InvalidError(f"'{ref_param}' is not a reference parameter of {source}")
    inner = parse_criterion(source, inner_name, raw, depth + 1)
    return Criterion("_has", "special", None, (), has=(source, ref_param, inner))


def _parse_include(raw: str, iterate: bool, rev: bool) -> Include:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not is_resource_type(parts[0]):
        raise InvalidError(f"Malformed _include '{raw}': expected Type:param[:target]")
    param = params_for(parts[0]).get(parts[1])
    if param is None or param.type != "reference":
        raise InvalidError(f"'{parts[1]}' is not a reference parameter of {parts[0]}")
    target = parts[2] if len(parts) == 3 else None
    if target is not None and not is_resource_type(target):
        raise InvalidError(f"Unknown target type '{target}' in '{raw}'")
    return Include(parts[0], parts[1], target, iterate)


def _parse_sort(resource_type: str | None, raw: str) -> list[tuple[str, bool]]:
    keys = []
    for item in raw.split(","):
        name, desc = (item[1:], True) if item.startswith("-") else (item, False)
        known = name in ("_id", "_lastUpdated") or (
            resource_type is not None and name in params_for(resource_type)
            and params_for(resource_type)[name].type != "reference")
        if not known:
            raise InvalidError(f"Cannot sort by '{name}'")
        keys.append((name, desc))
    return keys


def parse(resource_type: str | None, pairs: list[tuple[str, str]], *, lenient: bool,
          default_count: int, max_count: int) -> SearchQuery:
    """Turn query pairs into a SearchQuery; raise (or, lenient, drop) what is wrong."""
    query = SearchQuery(resource_type, count=default_count)
    for name, raw in pairs:
        try:
            _apply(query, name, raw, max_count)
        except (InvalidError, NotSupportedError) as exc:
            if not lenient or name in RESULT_PARAMS:
                raise
            query.ignored.append(Issue("invalid", f"Ignored: {exc.diagnostics}",
                                       severity="warning", expression=(name,)))
            continue
        if name != "_cursor":
            query.raw.append((name, raw))
    return query


def _apply(query: SearchQuery, name: str, raw: str, max_count: int) -> None:
    base = name.split(":")[0].split(".")[0]
    if base == "_count":
        if not (raw.isascii() and raw.isdigit()):
            raise InvalidError("_count must be a non-negative integer")
        query.count = min(int(raw), max_count)
    elif base == "_sort":
        query.sort = _parse_sort(query.resource_type, raw)
    elif base in ("_include", "_revinclude"):
        iterate = name.endswith(":iterate") or name.endswith(":recurse")
        target = query.includes if base == "_include" else query.revincludes
        target.extend(_parse_include(v, iterate, base == "_revinclude") for v in raw.split(","))
    elif base == "_summary":
        if raw not in SUMMARY:
            raise InvalidError(f"_summary must be one of {', '.join(sorted(SUMMARY))}")
        query.summary = None if raw == "false" else raw
    elif base == "_elements":
        query.elements = [e.strip() for e in raw.split(",") if e.strip()]
    elif base == "_total":
        if raw not in TOTAL:
            raise InvalidError(f"_total must be one of {', '.join(sorted(TOTAL))}")
        query.total = raw
    elif base == "_totalMethod":  # Aidbox's name for _total, sent by fhirpy's count()
        if raw not in ("count", "estimate"):
            raise InvalidError("_totalMethod must be count or estimate")
        query.total = "accurate" if raw == "count" else "estimate"
    elif base == "_cursor":
        query.cursor = raw
    elif base in ("_format", "_pretty"):
        return
    elif base in UNSUPPORTED:
        raise NotSupportedError(f"Search parameter '{base}' is not supported")
    elif query.resource_type is None:
        if base not in params_for("Resource"):  # only what every resource type has
            raise InvalidError(f"'{name}' needs a resource type: search /fhir/Type?{name}=…")
        query.criteria.append(parse_criterion("Resource", name, raw))
    else:
        query.criteria.append(parse_criterion(query.resource_type, name, raw))
