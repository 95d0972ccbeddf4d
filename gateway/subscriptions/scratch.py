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
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import StaticPool

from gateway.services.context import Context
from gateway.services.search import match_ids
from gateway.store.repository import Repository
from gateway.store.schema import metadata

SCRATCH_ID = "scratch"


class Scratch:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx  # settings and base URL only: no grant, no database of record
        self._engine: Engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        metadata.create_all(self._engine)
        self._lock = threading.Lock()

    def matches(self, resource: dict[str, Any],
                criteria: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bool:
        """True when the resource meets every criterion (an empty list: always)."""
        if not criteria:
            return True
        resource_type = resource["resourceType"]
        with self._lock, self._engine.connect() as conn:
            transaction = conn.begin()
            try:
                repo = Repository(conn)
                created = repo.create({**resource, "id": SCRATCH_ID}, SCRATCH_ID)
                return bool(match_ids(self._ctx.within(conn), repo, resource_type,
                                      [("_id", created.id), *criteria], limit=1))
            finally:
                transaction.rollback()

    def close(self) -> None:
        self._engine.dispose()
