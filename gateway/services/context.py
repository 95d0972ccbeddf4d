"""What an interaction needs: the database, settings, the caller, the open transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection

from gateway.audit.events import RequestAudit
from gateway.auth.tokens import Grant
from gateway.settings import Settings
from gateway.store.database import Database
from gateway.store.repository import Actor, Repository, Version, point_read


@dataclass(frozen=True)
class FhirRequest:
    """One FHIR interaction, whether it came over HTTP or inside a Bundle."""

    method: str
    path: str  # relative to the FHIR base, without leading slash: "Task/1/_history/2"
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes | None = None
    resource: Any = None  # an already parsed body (Bundle entries)
    content_type: str | None = None
    assigned_id: str | None = None  # id chosen up front for a transaction's POST entry

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass
class FhirResponse:
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    resource: dict[str, Any] | None = None  # for Bundle responses that embed it


@dataclass
class Context:
    """Per-request services; `conn` is set while replaying a transaction Bundle."""

    db: Database
    settings: Settings
    base_url: str
    actor: Actor = field(default_factory=Actor)
    conn: Connection | None = None
    grant: Grant | None = None  # what the caller's token allows; None: internal or auth off
    audit: RequestAudit | None = None  # the request's audit record; None: internal callers

    @contextmanager
    def writing(self) -> Iterator[Repository]:
        """A transaction for this request's writes, which stores the request's audit
        record with them (inside a transaction Bundle: with the Bundle's commit)."""
        if self.conn is not None:
            repo = Repository(self.conn, self.actor)
            yield repo
            if self.audit is not None:
                self.audit.note_written(repo.written)
            return
        with self.db.write() as conn:
            repo = Repository(conn, self.actor)
            yield repo
            if self.audit is not None:
                self.audit.store_with(conn, repo.written)

    @contextmanager
    def reading(self) -> Iterator[Repository]:
        if self.conn is not None:
            yield Repository(self.conn, self.actor)
            return
        with self.db.read() as conn:
            yield Repository(conn, self.actor)

    def point_read(self, resource_type: str, resource_id: str,
                   version: int | None = None) -> Version | None:
        """One resource (or one version of it): inside the open transaction if any."""
        if self.conn is None:
            return point_read(self.db, resource_type, resource_id, version)
        repo = Repository(self.conn, self.actor)
        if version is None:
            return repo.read(resource_type, resource_id)
        return repo.vread(resource_type, resource_id, version)

    def within(self, conn: Connection) -> Context:
        return replace(self, conn=conn)

    def url(self, *parts: str) -> str:
        return "/".join([self.base_url, *parts])
