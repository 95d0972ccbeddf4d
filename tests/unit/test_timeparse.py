"""FHIR date, dateTime and instant strings as ranges of epoch microseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.store.timeparse import (
    date_range,
    format_http_date,
    format_instant,
    now_micros,
    parse_http_date,
)


def micros(*parts: int) -> int:
    moment = datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type, misc]
    return int(moment.timestamp()) * 1_000_000


@pytest.mark.parametrize(("text", "low", "high"), [
    ("2024", micros(2024, 1, 1), micros(2025, 1, 1) - 1),
    ("2024-02", micros(2024, 2, 1), micros(2024, 3, 1) - 1),
    ("2024-12", micros(2024, 12, 1), micros(2025, 1, 1) - 1),
    ("2024-02-29", micros(2024, 2, 29), micros(2024, 3, 1) - 1),
    ("2024-03-01T10:15", micros(2024, 3, 1, 10, 15), micros(2024, 3, 1, 10, 16) - 1),
    ("2024-03-01T10:15:30Z", micros(2024, 3, 1, 10, 15, 30),
     micros(2024, 3, 1, 10, 15, 31) - 1),
    ("2024-03-01T10:15:30+02:00", micros(2024, 3, 1, 8, 15, 30),
     micros(2024, 3, 1, 8, 15, 31) - 1),
    ("2024-03-01T01:00:00-05:30", micros(2024, 3, 1, 6, 30), micros(2024, 3, 1, 6, 30, 1) - 1),
    ("2024-03-01T10:15:30.123Z", micros(2024, 3, 1, 10, 15, 30) + 123_000,
     micros(2024, 3, 1, 10, 15, 30) + 123_999),
    ("2024-03-01T10:15:30.123456Z", micros(2024, 3, 1, 10, 15, 30) + 123_456,
     micros(2024, 3, 1, 10, 15, 30) + 123_456),
    ("2024-03-01T10:15:30.1234567Z", micros(2024, 3, 1, 10, 15, 30) + 123_456,
     micros(2024, 3, 1, 10, 15, 30) + 123_456),
    (" 1980 ", micros(1980, 1, 1), micros(1981, 1, 1) - 1),
    ("1969-12-31", micros(1969, 12, 31), micros(1970, 1, 1) - 1),
])
def test_date_range_covers_the_whole_precision(text: str, low: int, high: int) -> None:
    assert date_range(text) == (low, high)


@pytest.mark.parametrize("text", [
    "", "yesterday", "2024-1", "2024-13", "2023-02-29", "2024-04-31", "24-01-01",
    "2024-03-01T25:00", "2024-03-01T10", "2024-03-01 10:00", "2024-03-01T10:00:00+2",
    "99999",
])
def test_date_range_rejects_what_is_not_a_fhir_date(text: str) -> None:
    assert date_range(text) is None


def test_format_instant_shows_milliseconds_in_utc() -> None:
    assert format_instant(micros(2024, 3, 1, 10, 15, 30) + 123_456) == (
        "2024-03-01T10:15:30.123Z")
    assert format_instant(0) == "1970-01-01T00:00:00.000Z"


def test_http_dates_round_trip() -> None:
    moment = micros(2024, 3, 1, 10, 15, 30)
    text = format_http_date(moment)
    assert text == "Fri, 01 Mar 2024 10:15:30 GMT"
    assert parse_http_date(text) == moment
    assert parse_http_date("not a date") is None


def test_now_is_truncated_to_the_millisecond() -> None:
    now = now_micros()
    assert now % 1000 == 0
    assert abs(now - int(datetime.now(UTC).timestamp() * 1_000_000)) < 60_000_000


@pytest.mark.parametrize("micros", [0, 999, 1_000, 1_700_000_000_123_456, -1, -1_000_001,
                                    253_402_300_799_999_999, 951_782_400_000_000])
def test_instants_and_http_dates_match_a_direct_strftime(micros: int) -> None:
    """The per-second caches change nothing: the same text as formatting the moment."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert format_instant(micros) == (moment.strftime("%Y-%m-%dT%H:%M:%S.")
                                      + f"{moment.microsecond // 1000:03d}Z")
    assert format_http_date(micros) == moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


def test_now_is_whole_milliseconds_close_to_the_clock() -> None:
    now = now_micros()
    assert now % 1000 == 0
    assert abs(now - datetime.now(UTC).timestamp() * 1_000_000) < 5_000_000
