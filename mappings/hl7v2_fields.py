"""HL7 v2 field values for the LIMS bridge (mappings/hl7v2.py): where a value sits, reading
and escaping it, dates and times both ways, coding systems. Pure.

Spec: HL7 v2.5.1 chapter 2 (control): 2.7 escape sequences, 2.A.22 DTM, table 0396
(coding systems), table 0357 (message error condition codes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

ATM = "https://atm-gateway.org/fhir"
LOCAL_SYSTEM = f"{ATM}/CodeSystem/hl7v2"  # a v2 local coding system N: LOCAL_SYSTEM-N
SYSTEMS = {"LN": "http://loinc.org", "SCT": "http://snomed.info/sct",
           "UCUM": "http://unitsofmeasure.org", "HL70078":
           "http://terminology.hl7.org/CodeSystem/v2-0078"}
# HL7 table 0357, the codes our refusals use.
SEGMENT_SEQUENCE, REQUIRED_MISSING, DATA_TYPE, TABLE_VALUE = "100", "101", "102", "103"
UNSUPPORTED_TYPE, UNSUPPORTED_EVENT, UNKNOWN_KEY, INTERNAL = "200", "201", "204", "207"
ERROR_TEXT = {"100": "Segment sequence error", "101": "Required field missing",
              "102": "Data type error", "103": "Table value not found",
              "200": "Unsupported message type", "201": "Unsupported event code",
              "204": "Unknown key identifier", "207": "Application internal error"}
_DTM = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?"
                  r"([+-]\d{4})?")
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


@dataclass(frozen=True)
class Where:
    """A place in a message: segment, its occurrence, field, component (HL7 ERL)."""

    segment: str
    field: int = 0
    sequence: int = 1
    component: int = 0

    def __str__(self) -> str:
        place = self.segment + (f"-{self.field}" if self.field else "")
        place += f".{self.component}" if self.component else ""
        return place + (f" (the {_ordinal(self.sequence)} {self.segment})"
                        if self.sequence > 1 else "")

    def erl(self) -> str:
        """ERR-2: segment^sequence^field^repetition^component."""
        parts = [self.segment, str(self.sequence)]
        if self.field:
            parts += [str(self.field), "1"] + ([str(self.component)] if self.component else [])
        return "^".join(parts)


class Hl7Error(ValueError):
    """A message we cannot take, with where and why: answered with `ack_code`."""

    ack_code = "AE"

    def __init__(self, reason: str, where: Where, code: str = INTERNAL) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason, self.where, self.code = reason, where, code


class Hl7ParseError(Hl7Error):
    """Not a message we can read at all (no MSH, unsupported type): rejected (AR)."""

    ack_code = "AR"


class Hl7MappingError(Hl7Error):
    """A readable message whose content cannot be mapped or applied: an error (AE)."""


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


# -- reading -----------------------------------------------------------------------------
def value(segment: Any, field: int, component: int = 1, repetition: int = 1,
          sub: int = 1) -> str:
    """The text at a place of a python-hl7 segment (unescaped by python-hl7, a \\.br\\
    line break as a newline); '' where nothing is."""
    try:
        found = segment.extract_field(1, field, repetition, component, sub)
    except IndexError:  # fewer repetitions or components than asked for
        return ""
    return str(found).replace("\r", "\n") if found else ""


def repetitions(segment: Any, field: int) -> int:
    if field >= len(segment) or not segment[field]:
        return 0
    return len(segment[field]) if isinstance(segment[field], list) else 1


def escape(text: str) -> str:
    """A value as field content: delimiters escaped, line breaks as \\.br\\. (python-hl7's
    escape writes non-ASCII as \\X..\\ hex; our messages declare UTF-8 and carry it as is.)"""
    for plain, escaped in _ESCAPES:
        text = text.replace(plain, escaped)
    return text.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


# -- dates and times ---------------------------------------------------------------------
def offset_of(dtm: str) -> timezone:
    """The UTC offset a DTM carries (MSH-7's applies to times sent without one), else UTC."""
    match = _DTM.fullmatch(dtm.strip())
    if match is None or match.group(8) is None:
        return UTC
    sign, hours, minutes = match.group(8)[0], int(match.group(8)[1:3]), int(match.group(8)[3:])
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if sign == "-" else delta)


def fhir_datetime(dtm: str, where: Where, zone: timezone, *, instant: bool = False) -> str:
    """An HL7 DT/DTM/TS as a FHIR dateTime: a date alone stays a date, a time gets the
    message's offset if it has none. `instant`: always a full time (a date alone is
    the end of that day, the latest moment it names)."""
    text = dtm.strip().split("^")[0]
    match = _DTM.fullmatch(text)
    if match is None:
        raise Hl7MappingError(f"{dtm!r} is not an HL7 date/time (YYYYMMDD[HHMM[SS]][+ZZZZ])",
                              where, DATA_TYPE)
    year, month, day, hour, minute, second = (int(g) if g else None for g in match.groups()[:6])
    if instant and day is None:
        raise Hl7MappingError(f"{dtm!r} names no day", where, DATA_TYPE)
    zone = offset_of(text) if match.group(8) else zone
    try:
        if hour is None and not instant:
            return f"{year:04d}" + "".join(f"-{p:02d}" for p in (month, day) if p is not None)
        moment = datetime(year or 0, month or 1, day or 1, 23 if hour is None else hour,
                          59 if hour is None else minute or 0,
                          59 if hour is None else second or 0, tzinfo=zone)
    except ValueError as exc:
        raise Hl7MappingError(f"{dtm!r} is not a real date/time ({exc})", where,
                              DATA_TYPE) from exc
    return moment.isoformat().replace("+00:00", "Z")


def hl7_datetime(value: str | datetime) -> str:
    """A FHIR dateTime (or an aware datetime) as an HL7 DTM, to the second, with offset."""
    if isinstance(value, str):
        if len(value) <= 10:  # a date
            return value.replace("-", "")
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.strftime("%Y%m%d%H%M%S") + (value.strftime("%z") or "+0000")


# -- codes -------------------------------------------------------------------------------
def system_uri(name: str) -> str | None:
    """A v2 coding system name (table 0396) as a FHIR system URI; local ones under ours."""
    name = name.strip()
    if not name:
        return None
    return SYSTEMS.get(name.upper(), f"{LOCAL_SYSTEM}-{name}")


def coding(code: str, display: str, system: str) -> dict[str, Any]:
    found: dict[str, Any] = {"code": code}
    if uri := system_uri(system):
        found = {"system": uri, **found}
    return {**found, "display": display} if display else found
