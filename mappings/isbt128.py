"""Chain-of-identity codes in the ISBT 128 form: structure and check character. Pure.

A code has the structure of the ISBT 128 identification number that ICCBBA's Chain of
Identity Identifier (ST-028) builds on: the Facility Identification Number (FIN, one
letter and four digits, assigned by ICCBBA), the two-digit year, and a six-digit
sequence number unique within the facility and year: 13 characters. The eye-readable
check character follows, computed with ISO 7064 modulo 37-2 over those 13 characters, as
ISBT 128 specifies; a scanner or a person typing the code makes it possible to catch a
misread. Stored compact ("A000126000042H"), printed in groups ("A0001 26 000042 H").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*"  # ISO 7064 values 0..36
FACILITY = re.compile(r"[A-Z][0-9]{4}")
_CODE = re.compile(r"([A-Z][0-9]{4})([0-9]{2})([0-9]{6})([0-9A-Z*])")
_SEPARATORS = re.compile(r"[\s-]+")
MAX_SEQUENCE = 999_999


class CoiFormatError(ValueError):
    """A code that is not a well-formed chain-of-identity code (the message says why)."""


def check_character(data: str) -> str:
    """ISO 7064 mod 37-2 over `data` (characters of ALPHABET): each value weighted by
    2 to the power of its position from the right (1-based), summed; the check value is
    (38 - sum mod 37) mod 37, written as that character of ALPHABET."""
    total = 0
    for position, char in enumerate(reversed(data), start=1):
        value = ALPHABET.find(char)
        if value < 0 or char == "*":
            raise CoiFormatError(f"{char!r} cannot be part of an ISBT 128 identifier")
        total += value * 2 ** position
    return ALPHABET[(38 - total % 37) % 37]


@dataclass(frozen=True)
class Coi:
    facility: str
    year: int  # two digits
    sequence: int

    @property
    def data(self) -> str:
        return f"{self.facility}{self.year:02d}{self.sequence:06d}"

    @property
    def value(self) -> str:
        """The compact form stored in identifiers: data and check character."""
        return self.data + check_character(self.data)

    @property
    def eye_readable(self) -> str:
        return f"{self.facility} {self.year:02d} {self.sequence:06d} {self.value[-1]}"


def make(facility: str, year: int, sequence: int) -> Coi:
    if not FACILITY.fullmatch(facility):
        raise CoiFormatError(f"facility {facility!r} is not a FIN (a letter, four digits)")
    if not 0 <= year <= 99 or not 1 <= sequence <= MAX_SEQUENCE:
        raise CoiFormatError(f"year {year} or sequence {sequence} is out of range")
    return Coi(facility, year, sequence)


def parse(scanned: str) -> Coi:
    """A scanned or typed code (spaces, hyphens, a leading '=' data identifier and lower
    case are accepted): its parts once structure and check character hold."""
    text = _SEPARATORS.sub("", scanned.strip()).upper().removeprefix("=")
    match = _CODE.fullmatch(text)
    if match is None:
        raise CoiFormatError(f"{scanned!r} is not a chain-of-identity code: expected a FIN "
                             "(a letter, four digits), a two-digit year, a six-digit "
                             "sequence number and a check character")
    facility, year, sequence, check = match.groups()
    expected = check_character(facility + year + sequence)
    if check != expected:
        raise CoiFormatError(f"{scanned!r} has check character {check!r}, not {expected!r}: "
                             "the code was misread or mistyped")
    return Coi(facility, int(year), int(sequence))
