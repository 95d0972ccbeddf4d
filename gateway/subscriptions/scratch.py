"""Search criteria tested on one version of one resource, with the server's own search.

Topic query criteria (`previous`, `current`) and Subscription filters are search criteria,
and they must hold for the very version an event is about (the previous version, a
version since replaced), not for what the store holds now. So the version is written into
a private in-memory database with the same schema, searched there with the same code
that answers GET requests, and rolled back: one definition of what `status:not=done` or
`owner=Organization/x` means, whichever way it is asked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.pool import StaticPool

from gateway.services.context import Context
from gateway.services.search import match_ids
from gateway.store.repository import Repository
from gateway.store.schema import metadata

Criteria = tuple[tuple[str, str], ...]


class Loaded:
    """One version, written into the scratch database when first asked about; each set
    of criteria is searched once, however many Subscriptions ask."""

    def __init__(self, scratch: Scratch, resource: dict[str, Any], resource_id: str) -> None:
        self._scratch, self.resource, self._id = scratch, resource, resource_id
        self._written = False
        self._answers: dict[Criteria, bool] = {}

    def matches(self, criteria: Criteria) -> bool:
        """True when the version meets every criterion (no criteria: always)."""
        if not criteria:
            return True
        if criteria not in self._answers:
            conn = self._scratch.connection()
            repo = Repository(conn)
            if not self._written:
                repo.create({**self.resource, "id": self._id}, self._id)
                self._written = True
            self._answers[criteria] = bool(match_ids(
                self._scratch.ctx.within(conn), repo, self.resource["resourceType"],
                [("_id", self._id), *criteria], limit=1))
        return self._answers[criteria]


class Scratch:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx  # settings and base URL only: no grant, no database of record
        self._engine: Engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        metadata.create_all(self._engine)
        self._lock = threading.Lock()
        self._conn: Connection | None = None

    def connection(self) -> Connection:
        assert self._conn is not None, "use Scratch.loaded()"
        return self._conn

    @contextmanager
    def loaded(self, *versions: dict[str, Any] | None) -> Iterator[list[Loaded | None]]:
        """Versions to test criteria on (None stays None), until the block ends and the
        scratch database is emptied again."""
        with self._lock, self._engine.connect() as conn:
            transaction = conn.begin()
            self._conn = conn
            try:
                yield [Loaded(self, v, f"scratch-{n}") if v is not None else None
                       for n, v in enumerate(versions)]
            finally:
                self._conn = None
                transaction.rollback()

    def close(self) -> None:
        self._engine.dispose()
