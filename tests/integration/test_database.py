"""The storage engine's transaction guarantees, on SQLite (group commit) and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

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
