"""Engines and transactions for SQLite (embedded) and PostgreSQL (production).

SQLite has one writer at a time: concurrent writers would spin on "database is locked",
so every write transaction takes a process-wide lock first and opens with
BEGIN IMMEDIATE. PostgreSQL writers run concurrently; optimistic version checks and
unique constraints keep them correct.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.pool import QueuePool

from gateway.settings import Settings


def make_engine(settings: Settings) -> Engine:
    if settings.is_sqlite:
        settings.ensure_sqlite_dir()
        engine = create_engine(
            settings.sqlalchemy_url,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=QueuePool, pool_size=8, max_overflow=56,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(settings.sqlalchemy_url, pool_size=16, max_overflow=16,
                         pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = "IMMEDIATE" if conn.info.get("write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """Hands out read and write transactions on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._writer = threading.Lock() if self.is_sqlite else None

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: commits when the block ends, rolls back on error."""
        if self._writer is not None:
            with self._writer, self._begin(write=True) as conn:
                yield conn
        else:
            with self._begin(write=True) as conn:
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._begin(write=False) as conn:
            yield conn

    @contextmanager
    def _begin(self, write: bool) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.info["write"] = write
            with conn.begin():
                yield conn

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
