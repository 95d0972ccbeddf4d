"""Server-assigned ids are UUIDs version 7: unique, and ordered by creation time."""

from __future__ import annotations

import time
import uuid

from gateway.store.repository import new_id


def test_ids_are_version_7_uuids_and_unique() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:100]:
        parsed = uuid.UUID(value)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == value  # canonical lower-case form, a valid FHIR id


def test_ids_grow_with_time() -> None:
    earlier = new_id()
    time.sleep(0.002)
    later = new_id()
    assert earlier < later
    millis = uuid.UUID(later).int >> 80
    assert abs(millis - time.time() * 1000) < 5_000
