"""FHIR date, dateTime and instant strings as ranges of epoch microseconds.

A value covers its whole precision (https://hl7.org/fhir/R4/search.html#date):
"2024-03" is every instant of March 2024. Values without a zone are taken as UTC.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache

_PATTERN = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _zone(tz: str | None) -> timedelta:
    if not tz or tz == "Z":
        return timedelta(0)
    sign = 1 if tz[0] == "+" else -1
    return sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))


def _next_month(year: int, month: int) -> datetime:
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def date_range(text: str) -> tuple[int, int] | None:
    """[low, high] in µs (both inclusive) or None when the text is not a FHIR date."""
    m = _PATTERN.match(text.strip())
    if not m:
        return None
    try:
        year = int(m["y"])
        if m["m"] is None:
            return _micros(datetime(year, 1, 1, tzinfo=UTC)), _micros(
                datetime(year + 1, 1, 1, tzinfo=UTC)) - 1
        month = int(m["m"])
        if m["d"] is None:
            start = datetime(year, month, 1, tzinfo=UTC)
            return _micros(start), _micros(_next_month(year, month)) - 1
        day = datetime(year, month, int(m["d"]), tzinfo=UTC)
        if m["H"] is None:
            return _micros(day), _micros(day + timedelta(days=1)) - 1
        start = day.replace(hour=int(m["H"]), minute=int(m["M"])) - _zone(m["tz"])
        if m["S"] is None:
            return _micros(start), _micros(start + timedelta(minutes=1)) - 1
        start += timedelta(seconds=int(m["S"]))
        if m["f"] is None:
            return _micros(start), _micros(start + timedelta(seconds=1)) - 1
        digits = m["f"][1:]
        unit = 10 ** max(0, 6 - len(digits))
        micros = int(digits[:6].ljust(6, "0"))
        low = _micros(start) + micros
        return low, low + unit - 1
    except (ValueError, OverflowError):
        return None


def format_instant(micros: int) -> str:
    """An FHIR instant with millisecond precision in UTC, e.g. 2024-03-01T10:00:00.123Z."""
    seconds, rest = divmod(micros, 1_000_000)
    return f"{_instant_second(seconds)}.{rest // 1000:03d}Z"


def format_http_date(micros: int) -> str:
    """RFC 9110 IMF-fixdate for Last-Modified."""
    return _http_second(micros // 1_000_000)


# Every write and every read formats the current second or one close to it: strftime
# once per second rather than once or twice per request.
@lru_cache(maxsize=256)
def _instant_second(seconds: int) -> str:
    return (EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")


@lru_cache(maxsize=256)
def _http_second(seconds: int) -> str:
    return (EPOCH + timedelta(seconds=seconds)).strftime("%a, %d %b %Y %H:%M:%S GMT")


def parse_http_date(text: str) -> int | None:
    try:
        moment = datetime.strptime(text.strip(), "%a, %d %b %Y %H:%M:%S GMT")
    except ValueError:
        return None
    return _micros(moment.replace(tzinfo=UTC))


def now_micros() -> int:
    """Now, truncated to the millisecond precision that meta.lastUpdated shows."""
    return time.time_ns() // 1_000_000 * 1000
