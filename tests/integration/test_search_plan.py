"""The shape of the SQL behind a typical worklist search: it must read the search-index
tables through their indexes, never scan them whole (EXPLAIN on each backend)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection

from gateway import jsonio
from gateway.store import search_query, search_sql
from gateway.store.database import Database
from gateway.store.repository import Repository
from tests.conftest import analyze_store
from tests.factories import ref, task

WORKLIST = [("status", "ready"), ("owner", "Organization/org-1"), ("_count", "20")]


@pytest.fixture
def loaded(db: Database) -> Database:
    with db.write() as conn:
        repo = Repository(conn)
        for n in range(60):
            body = task(status=["ready", "completed", "requested"][n % 3],
                        owner=ref(f"Organization/org-{n % 4}"))
            repo.create(jsonio.loads(jsonio.dumps(body)), f"t{n}")
    return db


@pytest.fixture
def conn(loaded: Database) -> Iterator[Connection]:
    with loaded.read() as connection:
        yield connection


def plan(conn: Connection, pairs: list[tuple[str, str]], driven: bool) -> list[str]:
    """EXPLAIN of the page query, one line per plan node; PostgreSQL is told to avoid
    sequential scans, so one that remains means no index could serve."""
    query = search_query.parse("Task", pairs, lenient=False, default_count=20, max_count=100)
    query.base_url = "http://testserver/fhir"
    driver = search_sql.choose_driver(conn, query) if driven else None
    assert (driver is not None) == driven
    stmt, _, _ = search_sql.page_statement(query, driver)
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        return [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    analyze_store(conn)  # as autovacuum would have by the time it matters
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return [row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql)]


def full_scans(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("SCAN sp_") or line.startswith(
        "SCAN resources") or "Seq Scan" in line]


@pytest.mark.parametrize("driven", [True, False], ids=["driven", "walked"])
def test_worklist_search_reads_index_tables_through_indexes(conn: Connection,
                                                            driven: bool) -> None:
    lines = plan(conn, WORKLIST, driven)
    assert full_scans(lines) == [], lines
    text = "\n".join(lines)
    assert "sp_token" in text and "sp_reference" in text


def test_driven_worklist_search_starts_from_the_owner_index(conn: Connection) -> None:
    lines = plan(conn, WORKLIST, driven=True)
    if conn.dialect.name == "sqlite":
        assert any(line.startswith("SEARCH d_sp_reference USING COVERING INDEX ix_sp_reference_0")
                   or line.startswith("SEARCH d_sp_reference USING INDEX ix_sp_reference_0")
                   for line in lines), lines
        assert any("m_sp_token USING INDEX ix_sp_token_resource" in line
                   for line in lines), lines
    else:
        assert any("ix_sp_reference_0" in line for line in lines), "\n".join(lines)


def test_unselective_search_walks_resources_in_sort_order(conn: Connection) -> None:
    lines = plan(conn, [("status", "ready")], driven=False)
    assert full_scans(lines) == [], lines
    if conn.dialect.name == "sqlite":
        assert lines[0].startswith("SEARCH resources USING INDEX ix_resources_type_updated")


@pytest.mark.parametrize("driven", [True, False], ids=["driven", "walked"])
@pytest.mark.parametrize("pair", [("owner:Organization._id", "org-1"),
                                  ("_has:Task:part-of:status", "ready")])
def test_chain_and_has_searches_read_through_indexes(conn: Connection, pair: tuple[str, str],
                                                     driven: bool) -> None:
    lines = plan(conn, [pair], driven)
    assert full_scans(lines) == [], lines


def test_a_count_is_read_from_the_criterion_index_where_a_page_walks(
        conn: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status=ready` matches too many resources to drive a page (which fills quickly in
    sort order) but few enough to count from its index rather than from every resource."""
    monkeypatch.setattr(search_sql, "DRIVER_LIMIT", 10)  # 20 of the 60 Tasks are ready
    query = search_query.parse("Task", [("status", "ready"), ("_summary", "count")],
                               lenient=False, default_count=20, max_count=100)
    assert search_sql.choose_driver(conn, query) is None
    driver = search_sql.choose_driver(conn, query, counting=True)
    assert driver == 0
    stmt = search_sql.count_statement(query, driver)
    assert conn.execute(stmt).scalar_one() == 20
    if conn.dialect.name == "sqlite":
        sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        lines = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
        assert full_scans(lines) == [], lines
        assert any("d_sp_token" in line and "ix_sp_token_0" in line for line in lines), lines
