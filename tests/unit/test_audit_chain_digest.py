"""The audit chain's hash is a stored format: rows chained by earlier releases must still
verify. These pin `digest` to its documented definition, computed here with the standard
library, on the values audit rows hold (text in any script, control characters, big
integers, nulls)."""

from __future__ import annotations

import hashlib
import json
import random

from gateway.audit.chain import GENESIS, digest


def by_definition(previous: str, position: int, row: tuple[object, ...]) -> str:
    data = json.dumps([position, *row], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{previous}\n{data}".encode()).hexdigest()


def test_known_rows_keep_their_hashes() -> None:
    """Hashes as releases before this one computed them (json.dumps, as above)."""
    read = (1_700_000_000_000_000, "rest", "read", "R", "0", 200, "client-1",
            "Organization/centre", "127.0.0.1", "abc", "GET", "Task/1", None, "Task/1",
            "Task/1/_history/1")
    assert digest(GENESIS, 1, read) == (
        "cbf22619e1ef79c09c674426fbc2fe120b6d2ac048df18edbc5716d586c7f85d")
    search = (1, "rest", "search-type", "E", "0", 200, "clïent-é", None, None, None, "GET",
              "Patient", "name=Zoë\u2028\x01", None, None)
    assert digest(GENESIS, 2, search) == (
        "9a7089bc49ca3dbb85e4ba4b53086738a00f63eb020df3312fbd66163b1136b2")


def test_any_row_hashes_as_the_definition_says() -> None:
    rng = random.Random(20261124)
    alphabet = [chr(c) for c in (*range(0x00, 0x250), 0x7F, 0x2028, 0x2029, 0xFEFF, 0xD7FF,
                                 0xE000, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF)]
    previous = GENESIS
    for position in range(1, 3001):
        row: list[object] = []
        for _ in range(rng.randint(0, 15)):
            pick = rng.random()
            if pick < 0.2:
                row.append(None)
            elif pick < 0.4:
                row.append(rng.randint(-2**63, 2**63 - 1))
            else:
                row.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))
        expected = by_definition(previous, position, tuple(row))
        assert digest(previous, position, tuple(row)) == expected, row
        previous = expected
