"""Engines and transactions for SQLite (embedded) and PostgreSQL (production).

SQLite has one writer at a time. Rather than letting writers spin on "database is
locked", they take turns on one shared connection and share commits (group commit):
each writer's work runs in its own SAVEPOINT, and whoever finds no writer waiting
behind it commits the whole group. A writer returns only after the COMMIT that made its
work durable. WAL checkpoints run in a background thread, off the request path.
PostgreSQL writers run concurrently, each in its own transaction; optimistic version
checks and unique constraints keep them correct.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool

from gateway.settings import Settings

log = logging.getLogger(__name__)
# PostgreSQL aborts one of two transactions that lock rows in opposite orders (40P01) and
# may refuse a serialisation (40001): retrying the whole request is safe and expected.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
GROUP_LIMIT = 64          # most writers sharing one commit
CHECKPOINT_SECONDS = 0.5  # how often the background checkpointer looks at the WAL
MMAP_BYTES = 1 << 30      # how much of a SQLite database file is memory-mapped
WAL_RESTART_FRAMES = 8192  # a WAL this long (32 MB of 4 KB pages) is restarted from the top
WAL_KEEP_BYTES = 64 << 20  # what a restarted WAL file is truncated to, at most


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
    engine = create_engine(settings.sqlalchemy_url, pool_size=16, max_overflow=16,
                           pool_pre_ping=True)
    event.listen(engine, "connect", _postgres_session)
    return engine


def _postgres_session(dbapi_conn: Any, _record: Any) -> None:
    """Plan every statement with its values: otherwise PostgreSQL keeps, for a pooled
    connection's whole life, the generic plan it made while a table was small (a
    sequential scan). Measured: a primary-key read at 70k Tasks took tens of ms that way."""
    with dbapi_conn.cursor() as cur:
        cur.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_conn.commit()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA cache_size=-65536")
    # Each writer works in a SAVEPOINT, whose journal of touched pages spills to a temp
    # file past 64 KB; a Task create touches ~20 pages, so without this every create wrote
    # a temp file (~80 µs of a ~560 µs create).
    cur.execute("PRAGMA temp_store=MEMORY")
    # Pages are read from the OS cache through a memory map, not a read() per page miss:
    # at 100k Tasks this took ~20% off a primary-key read.
    cur.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
    cur.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
    cur.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")  # a restarted WAL shrinks
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = "IMMEDIATE" if conn.info.get("write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def is_transient(exc: BaseException) -> bool:
    """A database failure that the same request, retried, would likely not meet again."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in (
        TRANSIENT_SQLSTATES)


class CommitFailedError(RuntimeError):
    """The shared COMMIT of a group failed: none of its writers' work was stored."""


class _GroupCommitter:
    """Runs SQLite writers one at a time on one connection and commits them in groups."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._busy = False
        self._waiting = 0
        self._conn: Connection | None = None
        self._outer: Any = None
        self._group: int = 0       # number of the open group
        self._members = 0          # writers in the open group
        self._done: dict[int, BaseException | None] = {}  # group -> commit outcome
        self.restart_due = False  # set by the checkpointer when the WAL has grown long

    @contextmanager
    def write(self) -> Iterator[Connection]:
        conn, group = self._enter()
        try:
            savepoint = conn.begin_nested()
            try:
                yield conn
            except BaseException:
                savepoint.rollback()
                raise
            savepoint.commit()
        finally:
            self._leave()
        self._await(group)

    def _enter(self) -> tuple[Connection, int]:
        with self._cond:
            self._waiting += 1
            while self._busy:
                self._cond.wait()
            self._waiting -= 1
            self._busy = True
        try:
            if self._conn is None:
                self._conn = self._engine.connect()
                self._conn.info["write"] = True
            if self._outer is None:
                self._outer = self._conn.begin()
        except BaseException:
            self._discard_connection()
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            raise
        self._members += 1
        return self._conn, self._group

    def _leave(self) -> None:
        """Hand over to the next writer, or commit the group when nobody waits."""
        with self._cond:
            if self._waiting == 0 or self._members >= GROUP_LIMIT:
                self._commit_group()
            self._busy = False
            self._cond.notify_all()

    def _commit_group(self) -> None:
        outcome: BaseException | None = None
        try:
            self._outer.commit()
        except Exception as exc:  # noqa: BLE001 - every member must hear of it
            log.exception("group commit failed")
            outcome = CommitFailedError("the database could not commit")
            outcome.__cause__ = exc
            self._discard_connection()
        self._done[self._group] = outcome
        self._done.pop(self._group - 1000, None)  # forget long-finished groups
        self._outer, self._members = None, 0
        self._group += 1
        if self.restart_due and self._conn is not None:
            self._let_wal_restart()

    def _let_wal_restart(self) -> None:
        """Checkpoint the last frames while no writer is at work, so that the next write
        starts the WAL again from its beginning.

        The background checkpointer copies frames but can never catch up with writers
        that chain group after group: the WAL then only grows (1.2 GB for a 230 MB
        database after 100k Tasks), and every page lookup searches a longer WAL index.
        """
        self.restart_due = False
        try:
            self._conn.connection.dbapi_connection.execute(  # type: ignore[union-attr]
                "PRAGMA wal_checkpoint(PASSIVE)")
        except Exception:  # noqa: BLE001 - the background checkpointer tries again
            log.warning("WAL checkpoint before restart failed", exc_info=True)

    def _discard_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            finally:
                self._conn = None

    def _await(self, group: int) -> None:
        with self._cond:
            while group not in self._done:
                self._cond.wait()
            failure = self._done[group]
        if failure is not None:
            raise failure

    def close(self) -> None:
        with self._cond:
            if self._outer is not None:
                self._commit_group()
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _Checkpointer(threading.Thread):
    """Copies the SQLite WAL back into the database file in the background, and asks
    the writer to let the WAL restart once it has grown long."""

    def __init__(self, engine: Engine, writer: _GroupCommitter) -> None:
        super().__init__(name="sqlite-checkpointer", daemon=True)
        self._engine = engine
        self._writer = writer
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(CHECKPOINT_SECONDS):
            try:
                with self._engine.connect() as conn:
                    # (busy, frames in the WAL, frames copied to the database)
                    _, frames, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
            except Exception:  # noqa: BLE001 - a missed checkpoint is retried next round
                log.warning("WAL checkpoint failed", exc_info=True)
                continue
            if frames >= WAL_RESTART_FRAMES:
                self._writer.restart_due = True

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)


class Database:
    """Hands out read and write transactions on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._local = threading.local()
        self._point_conns: list[Any] = []  # every thread's point-read connection, to close
        self._writer = _GroupCommitter(engine) if self.is_sqlite else None
        self._checkpointer = (_Checkpointer(engine, self._writer)
                              if self._writer is not None else None)
        if self._checkpointer is not None:
            self._checkpointer.start()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One atomic unit of writes; durable when the block has exited without error."""
        if self._writer is not None:
            with self._writer.write() as conn:
                yield conn
            return
        with self._begin(write=True) as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._begin(write=False) as conn:
            yield conn

    @contextmanager
    def single_statement(self) -> Iterator[Connection]:
        """A connection outside any transaction, for one statement (atomic on its own):
        on PostgreSQL this saves the BEGIN and COMMIT round trips of a primary-key read
        (~370 µs down to ~250 µs here)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn

    @contextmanager
    def _begin(self, write: bool) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.info["write"] = write
            with conn.begin():
                yield conn

    def fetch_one(self, sqlite_sql: str, params: tuple[Any, ...]) -> Any:
        """One row of a single-statement SQLite read, without a pooled transaction.

        A lone SELECT is atomic in SQLite; skipping the pool checkout, BEGIN and COMMIT
        makes a primary-key read several times cheaper. Each thread keeps its own
        connection.
        """
        raw = getattr(self._local, "raw", None)
        if raw is None:
            raw = self._local.raw = self.engine.raw_connection()
            self._point_conns.append(raw)
        return raw.cursor().execute(sqlite_sql, params).fetchone()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._writer is not None:
            self._writer.close()
        for raw in self._point_conns:
            raw.close()
        self._point_conns.clear()
        self.engine.dispose()
