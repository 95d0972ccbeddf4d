"""Strict FHIR JSON parsing and precision-keeping serialisation (gateway.jsonio)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway import jsonio
from gateway.errors import InvalidError


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def rejection(body: bytes) -> str:
    with pytest.raises(InvalidError) as caught:
        jsonio.loads(body)
    assert caught.value.status == 400
    assert caught.value.outcome()["issue"][0]["code"] == "invalid"
    return caught.value.diagnostics


@pytest.mark.parametrize(("body", "diagnostics"), [
    (b"", "Malformed JSON at line 1 column 1"),
    (b"{", "Malformed JSON at line 1 column 2"),
    (b'{"a": 1,}', "Malformed JSON"),
    (b"{'a': 1}", "Malformed JSON"),
    (b'{"a": 1} {"b": 2}', "Extra data"),
    (b'{"a": "raw\ttab"}', "Invalid control character"),
    (b'{"a": 1, "a": 2}', "Duplicate JSON property 'a'"),
    (b'{"x": {"a": 1, "b": 2, "a": 3}}', "Duplicate JSON property 'a'"),
    (b'{"\\ud800": 1, "\\ud800": 2}', "Duplicate JSON property '\\ud800'"),
    (b'{"a": NaN}', "NaN is not a valid JSON number"),
    (b'{"a": Infinity}', "Infinity is not a valid JSON number"),
    (b'{"a": -Infinity}', "-Infinity is not a valid JSON number"),
    (b'{"a": 1e999}', "Number out of range: 1e999"),
    (b'{"a": -1e999}', "Number out of range"),
    (b'{"a": 1e-999}', "Number out of range"),
    (b'{"a": ' + b"1" * 400 + b"}", "Number out of range"),
    (b'{"a": 9223372036854775808}', "Number out of range"),
    (b'{"a": -9223372036854775808}', "Number out of range"),
    (b'{"a": 0.' + b"5" * 60 + b"}", "Number too long"),
    (b'{"a": "\xff"}', "Body is not valid UTF-8"),
    (b'{"a": "\xed\xa0\x80"}', "Body is not valid UTF-8"),
    (b'{"a": "\\u0000"}', "JSON string contains U+0000"),
    (b'{"a": "\\u001f"}', "JSON string contains U+001F"),
    (b'{"a": ["\\u000b"]}', "JSON string contains U+000B"),
    (b'{"\\u0001": 1}', "JSON string contains U+0001"),
    (b'{"a": "\\udc00"}', "JSON string contains U+DC00"),
    (b"[" * 5000 + b"]" * 5000, "Malformed JSON: nesting"),
    (b"[" * 65 + b"]" * 65, "JSON nested deeper than 64 levels"),
    (b'{"a":' * 65 + b"1" + b"}" * 65, "JSON nested deeper than 64 levels"),
])
def test_loads_rejects_what_fhir_json_forbids(body: bytes, diagnostics: str) -> None:
    assert diagnostics in rejection(body)


def test_loads_rejects_nesting_beyond_the_interpreter_limit() -> None:
    assert "nesting" in rejection(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"a": 1}', {"a": 1}),
    (b'{"a": -9223372036854775807}', {"a": -9223372036854775807}),
    (b'{"a": 1.50}', {"a": Decimal("1.50")}),
    (b'{"a": 1e5}', {"a": Decimal("1E+5")}),
    (b'{"a": -0.0}', {"a": Decimal("-0.0")}),
    (b'{"a": "tab\\t cr\\r lf\\n"}', {"a": "tab\t cr\r lf\n"}),
    (b'{"a": "\\ud83d\\ude00 \\\\u0000"}', {"a": "\U0001F600 \\u0000"}),
    ("\ufeff{}".encode(), {}),
    (b"[" * 64 + b"]" * 64, nested(64)),
])
def test_loads_accepts_valid_json(body: bytes, expected: object) -> None:
    assert jsonio.loads(body) == expected


def test_loads_parses_numbers_with_fraction_or_exponent_as_decimal() -> None:
    value = jsonio.loads(b'{"i": 7, "d": 7.0, "e": 7e0}')

    assert type(value["i"]) is int
    assert type(value["d"]) is Decimal and type(value["e"]) is Decimal


@pytest.mark.parametrize("number", [b"1.50", b"0.000100", b"-12.3400", b"100.0", b"1E+5",
                                    b"3.141592653589793238462643383279"])
def test_dumps_writes_decimals_as_they_were_written(number: bytes) -> None:
    body = b'{"valueDecimal":' + number + b"}"

    assert jsonio.dumps(jsonio.loads(body)) == body


def test_trusted_round_trip_keeps_decimal_precision() -> None:
    stored = jsonio.dumps({"a": Decimal("1.50"), "b": [Decimal("2.000")]})

    assert jsonio.dumps(jsonio.loads_trusted(stored)) == b'{"a":1.50,"b":[2.000]}'


def test_dumps_writes_compact_utf8() -> None:
    assert jsonio.dumps({"name": "Élodie", "n": 1, "ok": True}) == \
        '{"name":"Élodie","n":1,"ok":true}'.encode()


def test_dumps_refuses_unknown_objects() -> None:
    with pytest.raises(TypeError):
        jsonio.dumps({"a": object()})


@pytest.mark.parametrize("text", ["plain", "tab\tnew\nline\rreturn", "emoji \U0001F600", ""])
def test_check_text_accepts_fhir_strings(text: str) -> None:
    jsonio.check_text(text)


@pytest.mark.parametrize(("text", "code"), [("a\x00b", "U+0000"), ("\x7f\x1b", "U+001B"),
                                            ("\ud800", "U+D800")])
def test_check_text_rejects_control_characters(text: str, code: str) -> None:
    with pytest.raises(InvalidError, match=code.replace("+", r"\+")):
        jsonio.check_text(text)
