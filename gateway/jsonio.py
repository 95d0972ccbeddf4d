"""Strict JSON in, canonical JSON bytes out.

FHIR JSON (https://hl7.org/fhir/R4/json.html) forbids duplicate keys and has no NaN or
Infinity; decimals keep their written precision (1.50 stays 1.50), so they are parsed as
Decimal and written back verbatim.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from gateway.errors import InvalidError

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 40
MAX_DECIMAL_EXPONENT = 300
INT64 = 2**63


class _Reject(ValueError):
    """Raised inside the decoder's hooks; the message is safe to show a client."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Reject(f"Duplicate JSON property {ascii(key)}")
            seen.add(key)
    return out


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS or abs(value := int(text)) >= INT64:
        raise _Reject(f"Number out of range: {text[:20]}…")
    return value


def _parse_float(text: str) -> Decimal:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Reject(f"Number too long: {text[:20]}…")
    value = Decimal(text)
    if abs(value.adjusted()) > MAX_DECIMAL_EXPONENT:
        raise _Reject(f"Number out of range: {text}")
    return value


def _parse_constant(text: str) -> Any:
    raise _Reject(f"{text} is not a valid JSON number")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_int=_parse_int, parse_float=_parse_float,
    parse_constant=_parse_constant,
)


# FHIR strings allow no control characters but tab, CR and LF
# (https://hl7.org/fhir/R4/datatypes.html#string); an unpaired surrogate is not Unicode
# text at all and could not be written back out.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def check_text(text: str) -> None:
    """Refuse control characters and unpaired surrogates in client text (InvalidError)."""
    found = _BAD_CHARS.search(text)
    if found:
        raise InvalidError(f"JSON string contains U+{ord(found.group()):04X}, which FHIR "
                           "strings do not allow")


def _check_tree(value: Any) -> None:
    """Depth and string content of a parsed document, without recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidError(f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, item in node.items():
                check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            check_text(node)


def loads(body: bytes) -> Any:
    """Parse a request body; every failure is an InvalidError (HTTP 400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidError("Body is not valid UTF-8") from exc
    try:
        value = _DECODER.decode(text.lstrip("\ufeff"))
    except _Reject as exc:
        raise InvalidError(str(exc)) from exc
    except json.JSONDecodeError as exc:
        raise InvalidError(f"Malformed JSON at line {exc.lineno} column {exc.colno}: "
                           f"{exc.msg}") from exc
    except (RecursionError, InvalidOperation, ValueError) as exc:
        raise InvalidError("Malformed JSON: nesting or number out of bounds") from exc
    # The decoder refuses raw control characters and valid UTF-8 holds no lone surrogate,
    # so only \u escapes can bring either; and a text with few brackets cannot nest
    # deeply. Most bodies need no walk (~6 µs of a Task's ~7 µs parse).
    if "\\u" in text or text.count("{") + text.count("[") > MAX_DEPTH:
        _check_tree(value)
    return value


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Serialise to compact JSON; Decimals keep their precision."""
    return orjson.dumps(value, default=_default)


def loads_trusted(data: bytes) -> Any:
    """Parse JSON this server wrote itself (stored resources): fast, decimals as Decimal."""
    return json.loads(data, parse_float=Decimal)
