"""Who looks at an operations-health panel, and over which days: the viewer, whether its
role sees every organisation's data, and a range of UTC days as the store's µs."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol

from gateway.store.timeparse import micros_of

UNRESTRICTED = ("admin", "ehr")  # roles that see every organisation's data


class Viewer(Protocol):
    """Who looks: a client role (admin, treatment-centre, courier…) and its organisation
    ("Organization/<id>"), as gateway/dashboard/journeys.py's Viewer has them."""

    @property
    def role(self) -> str: ...

    @property
    def organization(self) -> str: ...


def unrestricted(viewer: Viewer) -> bool:
    return viewer.role in UNRESTRICTED


def day_span(since: date, until: date) -> tuple[int, int]:
    """[since 00:00, the day after until 00:00) in UTC µs: both days included."""
    start = datetime.combine(since, time(), UTC)
    end = datetime.combine(until + timedelta(days=1), time(), UTC)
    return micros_of(start), micros_of(end)
