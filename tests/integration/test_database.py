"""The storage engine's transaction guarantees, on SQLite (group commit) and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from gateway.settings import Settings
from gateway.store import database
from gateway.store.database import Database, make_engine
from gateway.store.repository import Repository
from gateway.store.schema import change_log, reactor_cursors, resources
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


def _refused_after_writing(ids: list[str]) -> Callable[[Database], str]:
    """A write function that creates a Task (its id noted in `ids`), then fails."""
    def refused(db: Database) -> str:
        with db.write() as conn:
            ids.append(Repository(conn).create(task()).id)
            raise RuntimeError("refused after writing")
    return refused


def _count_commits(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    commits: list[int] = []
    writer = db._writer
    assert writer is not None
    real_commit = writer._commit_group

    def counted_commit() -> BaseException | None:
        commits.append(writer._group)
        return real_commit()

    monkeypatch.setattr(writer, "_commit_group", counted_commit)
    return commits


def _on_loop(*writes: Callable[[Database], str], db: Database) -> list[object]:
    """Run the write functions on one event loop, all started in the same turn."""
    async def scenario() -> list[object]:
        return await asyncio.gather(*(db.write_on_loop(fn, db) for fn in writes),
                                    return_exceptions=True)
    return asyncio.run(scenario())


def _stored(db: Database, *ids: object) -> list[bool]:
    with db.read() as conn:  # durable once answered, visible to other connections
        repo = Repository(conn)
        return [repo.read("Task", str(i)) is not None for i in ids]


def test_writes_on_the_event_loop_share_a_commit(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    _sqlite_only(db)
    commits = _count_commits(db, monkeypatch)
    threads: list[int] = []

    ids = _on_loop(_create(threads), _create(threads), _create(threads), db=db)

    assert threads == [threading.get_ident()] * 3  # each ran once, on the loop's thread
    assert len(commits) == 1  # three writers, one COMMIT
    assert _stored(db, *ids) == [True] * 3


def test_loop_writer_refused_before_changing_rows_leaves_its_group_alone(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    _sqlite_only(db)
    commits = _count_commits(db, monkeypatch)
    threads: list[int] = []

    def refused(db: Database) -> str:
        with db.write() as conn:
            Repository(conn).read("Task", "nothing-here")
            raise RuntimeError("refused before writing")

    first, failed, third = _on_loop(_create(threads), refused, _create(threads), db=db)

    assert isinstance(failed, RuntimeError)
    assert len(threads) == 2 and len(commits) == 1  # nobody ran again
    assert _stored(db, first, third) == [True, True]


def test_loop_writer_failing_after_writing_is_undone_and_the_writers_before_it_run_again(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loop writers have no SAVEPOINT of their own: a failure after changing rows undoes
    the group, and the writers that were done run again (and answer the second run)."""
    _sqlite_only(db)
    commits = _count_commits(db, monkeypatch)
    threads: list[int] = []
    broken_ids: list[str] = []

    first, failed, third = _on_loop(_create(threads), _refused_after_writing(broken_ids),
                                    _create(threads), db=db)

    assert isinstance(failed, RuntimeError)
    assert len(threads) == 3  # the first writer ran twice, the third once
    assert len(commits) == 2  # the third with the group; the first's second run after it
    assert _stored(db, first, third, *broken_ids) == [True, True, False]
    assert _count(db) == 2
    assert _count(db, change_log) == 2


def test_after_an_undo_loop_writers_fail_alone_for_a_while(db: Database) -> None:
    """A stream of writes refused after writing must not make others run again and again:
    once a group was undone, loop writes take a SAVEPOINT for UNDO_CAREFUL_SECONDS."""
    _sqlite_only(db)
    threads: list[int] = []
    undone: list[str] = []
    broken = _refused_after_writing(undone)

    created = _create(threads)
    results = _on_loop(created, broken, created, broken, created, db=db)

    assert [isinstance(r, RuntimeError) for r in results] == [False, True, False, True, False]
    assert len(threads) == 4  # only the first writer ran again, after the first refusal
    assert _stored(db, *results[::2], *undone) == [True, True, True, False, False]
    assert db._writer is not None
    db._writer._careful_until = 0.0  # as once UNDO_CAREFUL_SECONDS have passed
    again = _on_loop(created, broken, db=db)
    assert len(threads) == 6  # no longer careful: the writer before the refusal ran again
    assert _stored(db, again[0]) == [True]


def test_later_write_of_a_loop_writer_fails_alone(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A function's second write has its SAVEPOINT: undone alone, the first kept."""
    _sqlite_only(db)
    commits = _count_commits(db, monkeypatch)
    threads: list[int] = []
    undone: list[str] = []

    def two_writes(db: Database) -> str:
        with db.write() as conn:
            kept = Repository(conn).create(task()).id
        with suppress(RuntimeError), db.write() as conn:
            undone.append(Repository(conn).create(task()).id)
            raise RuntimeError("the second write is refused")
        return kept

    first, kept = _on_loop(_create(threads), two_writes, db=db)

    assert len(threads) == 1 and len(commits) == 1  # nobody ran again
    assert _stored(db, first, kept, *undone) == [True, True, False]


def test_write_after_a_loop_writers_failure_is_kept(db: Database) -> None:
    """As a refused custody handoff records its stop: the failed write is undone with its
    group, and what the function writes next is committed."""
    _sqlite_only(db)
    threads: list[int] = []
    undone: list[str] = []

    def fail_then_record(db: Database) -> str:
        with suppress(RuntimeError), db.write() as conn:
            undone.append(Repository(conn).create(task()).id)
            raise RuntimeError("refused halfway")
        with db.write() as conn:
            return Repository(conn).create(task()).id

    first, recorded = _on_loop(_create(threads), fail_then_record, db=db)

    assert len(threads) == 2  # the first writer ran again
    assert _stored(db, first, recorded, *undone) == [True, True, False]


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


def test_a_reactor_starts_at_the_end_unless_an_open_transaction_may_fill_a_gap(
        db: Database, settings: Settings) -> None:
    """start_position: the newest change, also while a writer elsewhere (another
    schema, another database) holds a transaction open; just before a gap that a
    transaction still open may fill."""
    def start() -> int:
        with db.read() as conn:
            return database.start_position(conn, batch=2)  # the walk crosses batches

    def last() -> int:
        with db.read() as conn:
            return int(conn.execute(select(func.max(change_log.c.seq))).scalar_one())

    with db.write() as conn:
        Repository(conn).create(task())
    assert start() == last()
    if settings.is_sqlite:
        return  # one writer at a time, committing in order: the rest is PostgreSQL's
    elsewhere = Database(make_engine(settings))
    try:
        with elsewhere.write() as other:  # a writer open before the changes below
            other.execute(insert(reactor_cursors).values(name="elsewhere", seq=0,
                                                         updated_at=0))
            for _ in range(5):
                with db.write() as conn:
                    Repository(conn).create(task())
            assert start() == last()
            with elsewhere.write() as slow:  # numbered now, committed last
                Repository(slow).create(task())
                with db.write() as conn:
                    Repository(conn).create(task())
                assert start() == last() - 2
            assert start() == last()
    finally:
        elsewhere.dispose()
