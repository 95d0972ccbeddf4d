"""Chain-of-identity codes: ISO 7064 mod 37-2 check characters (against published
examples) and the parsing of scanned codes, good and corrupted."""

from __future__ import annotations

import pytest

from mappings import isbt128


@pytest.mark.parametrize("data, check", [
    ("G123498654321", "H"),  # the worked example of ISBT 128's check character annex
    ("A000126000042", "0"),
    ("W000012345678", isbt128.check_character("W000012345678")),
])
def test_known_check_characters(data: str, check: str) -> None:
    assert isbt128.check_character(data) == check


def test_every_check_value_can_occur_and_round_trips() -> None:
    seen = set()
    for sequence in range(1, 400):
        code = isbt128.make("A9999", 26, sequence)
        seen.add(code.value[-1])
        assert isbt128.parse(code.value) == code
        assert isbt128.parse(code.eye_readable) == code
    assert seen == set(isbt128.ALPHABET)  # '*' (value 36) included


@pytest.mark.parametrize("scanned", [
    "A9999 26 000042 " + isbt128.make("A9999", 26, 42).value[-1],
    "=" + isbt128.make("A9999", 26, 42).value,  # with the ISBT 128 data identifier
    isbt128.make("A9999", 26, 42).value.lower(),
    "A9999-26-000042-" + isbt128.make("A9999", 26, 42).value[-1],
])
def test_scans_are_read_in_their_usual_forms(scanned: str) -> None:
    assert isbt128.parse(scanned) == isbt128.Coi("A9999", 26, 42)


def test_every_single_character_misread_is_caught() -> None:
    """Mod 37-2 detects every single substitution and every adjacent transposition."""
    good = isbt128.make("B1234", 26, 4711).value
    for position in range(len(good)):
        for char in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*":
            if char == good[position]:
                continue
            corrupted = good[:position] + char + good[position + 1:]
            with pytest.raises(isbt128.CoiFormatError):
                isbt128.parse(corrupted)
    for position in range(len(good) - 2):
        if good[position] != good[position + 1]:
            swapped = (good[:position] + good[position + 1] + good[position]
                       + good[position + 2:])
            with pytest.raises(isbt128.CoiFormatError):
                isbt128.parse(swapped)


@pytest.mark.parametrize("bad, reason", [
    ("", "not a chain-of-identity code"),
    ("A999926000042", "not a chain-of-identity code"),  # no check character
    ("19999260000420", "not a chain-of-identity code"),  # the FIN starts with a letter
    ("A9999260000429", "check character"),
])
def test_malformed_codes_say_why(bad: str, reason: str) -> None:
    with pytest.raises(isbt128.CoiFormatError, match=reason):
        isbt128.parse(bad)


def test_make_checks_its_parts() -> None:
    with pytest.raises(isbt128.CoiFormatError):
        isbt128.make("AB123", 26, 1)
    with pytest.raises(isbt128.CoiFormatError):
        isbt128.make("A9999", 26, 0)
    with pytest.raises(isbt128.CoiFormatError):
        isbt128.make("A9999", 26, 1_000_000)
