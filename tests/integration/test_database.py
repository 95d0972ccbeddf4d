"""The storage engine's transaction guarantees, on SQLite (group commit) and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.store import database
from gateway.store.database import Database
from gateway.store.repository import Repository
from gateway.store.schema import change_log, resources
from tests.factories import task


def _count(db: Database, table=resources) -> int:  # type: ignore[no-untyped-def]
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_write_is_visible_to_other_connections_when_the_block_exits(db: Database) -> None:
    with db.write() as conn:
        version = Repository(conn).create(task())
    with db.read() as conn:
        assert Repository(conn).read("Task", version.id) is not None


def test_failed_writer_leaves_nothing_and_others_keep_their_work(db: Database) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(fail: bool) -> None:
        start.wait(timeout=10)
        try:
            with db.write() as conn:
                Repository(conn).create(task())
                if fail:
                    raise RuntimeError("business rule broken halfway")
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(errors) == 4
    assert _count(db) == 4
    assert _count(db, change_log) == 4


def test_many_concurrent_writers_all_commit(db: Database) -> None:
    def writer() -> None:
        for _ in range(25):
            with db.write() as conn:
                Repository(conn).create(task())

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert _count(db) == 200


def test_exception_inside_write_is_raised_unchanged(db: Database) -> None:
    with pytest.raises(KeyError, match="missing"), db.write() as conn:
        Repository(conn).create(task())
        raise KeyError("missing")
    assert _count(db) == 0


def test_sqlite_wal_restarts_under_continuous_writes(db: Database,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers chaining group after group never leave the background checkpointer a quiet
    moment: without a restart between groups the WAL grows as long as writes go on."""
    if not db.is_sqlite:
        pytest.skip("PostgreSQL has no WAL file of ours to bound")
    monkeypatch.setattr(database, "WAL_RESTART_FRAMES", 64)
    monkeypatch.setattr(database, "CHECKPOINT_SECONDS", 0.05)
    db.dispose()  # start a checkpointer with the settings above
    db = Database(db.engine)
    wal = Path(db.engine.url.database + "-wal")  # type: ignore[operator]
    stop = time.monotonic() + 3
    largest = 0

    def writer() -> None:
        while time.monotonic() < stop:
            with db.write() as conn:
                Repository(conn).create(task())

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
        time.sleep(0.01)
    written = _count(db)
    db.dispose()
    assert written > 200
    # Each Task writes ~20 pages of 4 KB; without restarts the WAL held them all.
    assert largest < written * 20 * 4096 / 4, (largest, written)


def _sqlite_only(db: Database) -> None:
    if not db.is_sqlite:
        pytest.skip("writes on the event loop are SQLite's (PostgreSQL writers run in parallel)")


def _create(threads: list[int] | None = None) -> Callable[[Database], str]:
    def create(db: Database) -> str:
        if threads is not None:
            threads.append(threading.get_ident())
        with db.write() as conn:
            return Repository(conn).create(task()).id
    return create


def test_writes_on_the_event_loop_share_a_commit_and_fail_alone(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    _sqlite_only(db)
    commits = []
    writer = db._writer
    assert writer is not None
    real_commit = writer._commit_group

    def counted_commit() -> None:
        commits.append(writer._group)
        real_commit()

    monkeypatch.setattr(writer, "_commit_group", counted_commit)

    def broken(db: Database) -> str:
        with db.write() as conn:
            Repository(conn).create(task())
            raise RuntimeError("business rule broken halfway")

    threads: list[int] = []

    async def scenario() -> list[object]:
        create = _create(threads)
        return await asyncio.gather(
            db.write_on_loop(create, db), db.write_on_loop(broken, db),
            db.write_on_loop(create, db), return_exceptions=True)

    first, failed, third = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError)
    assert threads == [threading.get_ident()] * 2  # on the event loop's thread
    assert len(commits) == 1  # three writers, one COMMIT
    with db.read() as conn:  # durable once answered, visible to other connections
        repo = Repository(conn)
        assert repo.read("Task", str(first)) is not None
        assert repo.read("Task", str(third)) is not None
    assert _count(db) == 2
    assert _count(db, change_log) == 2


def test_a_write_on_the_loop_waits_its_turn_behind_a_threaded_writer(db: Database) -> None:
    """While a thread holds the connection the loop does not block on it, and the write
    still runs on the loop once the thread is done (not moved to the thread pool, where
    writes under load would stay, each taking turns with the others)."""
    _sqlite_only(db)
    holding, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with db.write() as conn:
            Repository(conn).create(task())
            holding.set()
            release.wait(timeout=10)

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert holding.wait(timeout=10)

    threads: list[int] = []

    async def scenario() -> str:
        pending = asyncio.ensure_future(db.write_on_loop(_create(threads), db))
        await asyncio.sleep(0.05)
        assert not pending.done()  # queued behind the thread, the loop still turning
        release.set()
        return await pending

    created = asyncio.run(scenario())
    thread.join(timeout=10)
    assert threads == [threading.get_ident()]  # it ran on the event loop's thread
    with db.read() as conn:
        assert Repository(conn).read("Task", created) is not None
    assert _count(db) == 2
