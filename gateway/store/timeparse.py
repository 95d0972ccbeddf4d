"""FHIR date, dateTime and instant strings as ranges of epoch microseconds.

A value covers its whole precision (https://hl7.org/fhir/R4/search.html#date):
"2024-03" is every instant of March 2024. Values without a zone are taken as UTC.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

_PATTERN = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_SECOND = 1_000_000
_MINUTE = 60 * _SECOND
_DAY = 24 * 60 * _MINUTE


def micros_of(moment: datetime) -> int:
    """An aware datetime as µs since the epoch, the store's time."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def moment_of(micros: int) -> datetime:
    """The store's µs since the epoch as an aware datetime (UTC)."""
    return EPOCH + timedelta(microseconds=micros)


def _day(year: int, month: int, day: int) -> int:
    """Midnight UTC of a calendar day in µs (ValueError when there is no such day)."""
    return (date(year, month, day).toordinal() - _EPOCH_DAY) * _DAY


def _zone(tz: str | None) -> int:
    """A zone designator's offset from UTC in µs."""
    if not tz or tz == "Z":
        return 0
    sign = 1 if tz[0] == "+" else -1
    return sign * (int(tz[1:3]) * 60 + int(tz[4:6])) * _MINUTE


def date_range(text: str) -> tuple[int, int] | None:
    """[low, high] in µs (both inclusive) or None when the text is not a FHIR date."""
    m = _PATTERN.match(text.strip())
    if not m:
        return None
    year = int(m["y"])
    try:
        if m["m"] is None:
            return _day(year, 1, 1), _day(year + 1, 1, 1) - 1
        month = int(m["m"])
        if m["d"] is None:
            return _day(year, month, 1), _day(year + month // 12, month % 12 + 1, 1) - 1
        day = _day(year, month, int(m["d"]))
    except ValueError:  # month 13, 30 February, year 0 or past 9999
        return None
    if m["H"] is None:
        return day, day + _DAY - 1
    hour, minute = int(m["H"]), int(m["M"])
    if hour > 23 or minute > 59:
        return None
    start = day + (hour * 60 + minute) * _MINUTE - _zone(m["tz"])
    if m["S"] is None:
        return start, start + _MINUTE - 1
    start += int(m["S"]) * _SECOND
    if m["f"] is None:
        return start, start + _SECOND - 1
    digits = m["f"][1:]
    unit = 10 ** max(0, 6 - len(digits))
    low = start + int(digits[:6].ljust(6, "0"))
    return low, low + unit - 1


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
    return micros_of(moment.replace(tzinfo=UTC))


def now_micros() -> int:
    """Now, truncated to the millisecond precision that meta.lastUpdated shows."""
    return time.time_ns() // 1_000_000 * 1000
