"""Pages sorted by _lastUpdated that no criterion drives walk one criterion's index rows
in that order: the same pages, in the same order, as walking every resource."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection

from gateway import jsonio
from gateway.store import search_query, search_sql
from gateway.store.database import Database
from gateway.store.repository import Repository
from tests.conftest import analyze_store
from tests.factories import ref, task

STATUSES = ["ready", "completed", "requested"]


def worklist_task(n: int) -> dict[str, Any]:
    return task(status=STATUSES[n % 3], owner=ref(f"Organization/org-{n % 4}"),
                description=f"step {n}")


def page_ids(client: TestClient, query: str) -> list[list[str]]:
    """Every page of a search, following its next links."""
    pages: list[list[str]] = []
    url: str | None = f"/fhir/{query}"
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.text
        bundle = response.json()
        pages.append([e["resource"]["id"] for e in bundle.get("entry", [])])
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"),
                   None)
    return pages


@pytest.fixture
def worklist(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """36 Tasks (12 per status, 9 per owner), then some updated: they move to the end of
    _lastUpdated order. No criterion is small enough to drive a search."""
    for n in range(36):
        body = {**worklist_task(n), "id": f"t{n:02d}"}
        assert client.put(f"/fhir/Task/t{n:02d}", json=body).status_code == 201
    for n in (0, 12, 5):
        body = {**worklist_task(n), "id": f"t{n:02d}", "description": "revised"}
        assert client.put(f"/fhir/Task/t{n:02d}", json=body).status_code == 200
    monkeypatch.setattr(search_sql, "DRIVER_LIMIT", 2)
    return client


QUERIES = [
    "Task?status=ready&owner=Organization/org-0&_count=2",
    "Task?status=ready&_count=4",
    "Task?owner=Organization/org-0&status:not=completed&_count=3",
    "Task?code=http://example.org/atm-step|apheresis&owner=Organization/org-1&_count=2",
    "Task?status=ready&owner=Organization/org-0&_count=2&_sort=_lastUpdated",
]


@pytest.fixture
def chosen(monkeypatch: pytest.MonkeyPatch) -> list[search_sql.Walk | None]:
    """What choose_walk decided for each page served, in order."""
    decisions: list[search_sql.Walk | None] = []
    choose = search_sql.choose_walk

    def spy(conn: Connection, q: search_query.SearchQuery,
            driver: int | None) -> search_sql.Walk | None:
        decisions.append(choose(conn, q, driver))
        return decisions[-1]

    monkeypatch.setattr(search_sql, "choose_walk", spy)
    return decisions


@pytest.mark.parametrize("query", QUERIES)
def test_walked_pages_are_the_pages_of_the_resource_walk(
        worklist: TestClient, monkeypatch: pytest.MonkeyPatch, query: str,
        chosen: list[search_sql.Walk | None]) -> None:
    walked = page_ids(worklist, query)
    assert chosen and all(w is not None for w in chosen), "the walk was not taken"
    monkeypatch.setattr(search_sql, "choose_walk", lambda conn, q, driver: None)
    assert page_ids(worklist, query) == walked
    assert sum(len(page) for page in walked) > 2


def test_updated_resources_are_walked_at_their_new_place(worklist: TestClient) -> None:
    ids = [i for page in page_ids(worklist, "Task?status=ready&_count=5") for i in page]
    assert ids[-2:] == ["t00", "t12"]  # ready, and updated after every other ready one
    assert sorted(ids) == [f"t{n:02d}" for n in range(0, 36, 3)]


def test_a_resource_holding_the_walked_code_twice_is_listed_once(
        worklist: TestClient, chosen: list[search_sql.Walk | None]) -> None:
    twice = task(id="twice", status="ready", code={"coding": [
        {"system": "http://example.org/atm-step", "code": "apheresis"},
        {"system": "http://example.org/other-steps", "code": "apheresis"}]})
    assert worklist.put("/fhir/Task/twice", json=twice).status_code == 201
    ids = [i for page in page_ids(worklist, "Task?code=apheresis&_count=7") for i in page]
    assert ids.count("twice") == 1 and len(ids) == 37
    assert chosen and all(w is not None for w in chosen), "the walk was not taken"


def test_descending_and_other_sorts_do_not_walk(
        worklist: TestClient, chosen: list[search_sql.Walk | None]) -> None:
    for sort in ("-_lastUpdated", "_id", "status"):
        ids = page_ids(worklist, f"Task?status=ready&_sort={sort}&_count=50")[0]
        assert len(ids) == 12
    assert chosen and all(walk is None for walk in chosen)  # (`status` sorts are driven)


# -- the plan: the walked index in order, no sort of the matches --------------------------
@pytest.fixture
def conn(db: Database) -> Iterator[Connection]:
    with db.write() as connection:
        repo = Repository(connection)
        for n in range(60):
            repo.create(jsonio.loads(jsonio.dumps(worklist_task(n))), f"t{n}")
    with db.read() as connection:
        yield connection


def walk_plan(conn: Connection, pairs: list[tuple[str, str]]) -> tuple[search_sql.Walk,
                                                                      list[str]]:
    query = search_query.parse("Task", pairs, lenient=False, default_count=20, max_count=100)
    query.base_url = "http://testserver/fhir"
    walk = search_sql.choose_walk(conn, query, None)
    assert walk is not None
    stmt, _, _ = search_sql.page_statement(query, None, walk)
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        return walk, [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    analyze_store(conn)
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return walk, [row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql)]


def test_the_smaller_criterion_is_walked_through_its_index_in_order(
        conn: Connection) -> None:
    # 20 Tasks are ready, 15 belong to org-0: the owner's rows are walked.
    walk, lines = walk_plan(conn, [("status", "ready"), ("owner", "Organization/org-0")])
    assert walk.criterion == 1
    text = "\n".join(lines)
    assert "ix_sp_reference_0" in text, text
    assert "Seq Scan" not in text and not any(line.startswith("SCAN ") for line in lines)
    if conn.dialect.name == "sqlite":
        assert lines[0].startswith("SEARCH w USING"), text
        assert "TEMP B-TREE" not in text, text  # neither sorted nor grouped apart
        assert any("m_sp_token USING INDEX ix_sp_token_resource" in line for line in lines)


def test_of_two_codes_the_one_with_fewer_matches_is_walked(conn: Connection) -> None:
    # Every Task has the apheresis code; a third of them are ready.
    walk, _ = walk_plan(conn, [("code", "http://example.org/atm-step|apheresis"),
                               ("status", "ready")])
    assert walk.criterion == 1


def test_a_token_code_is_walked_through_the_token_index(conn: Connection) -> None:
    walk, lines = walk_plan(conn, [("status", "ready")])
    assert walk.criterion == 0
    text = "\n".join(lines)
    assert "ix_sp_token_0" in text, text
    if conn.dialect.name == "sqlite":
        assert "TEMP B-TREE" not in text, text


@pytest.mark.parametrize("pairs", [
    [("status", "ready,completed")],            # two values: two orders to merge
    [("status:not", "ready")],                  # a modifier
    [("owner", "org-0")],                       # a reference without its type
    [("owner", "http://elsewhere.example/fhir/Organization/org-0")],  # not ours
    [("authored-on", "ge2020")],                # a date: matched by range
])
def test_criteria_without_an_ordered_index_are_not_walked(
        conn: Connection, pairs: list[tuple[str, str]]) -> None:
    query = search_query.parse("Task", pairs, lenient=False, default_count=20, max_count=100)
    query.base_url = "http://testserver/fhir"
    assert search_sql.choose_walk(conn, query, None) is None


def test_a_criterion_small_enough_to_drive_is_walked_when_it_can_be(
        conn: Connection) -> None:
    """Driving reads, checks and sorts every match; the walk stops at a full page."""
    query = search_query.parse("Task", [("status", "ready"), ("owner", "Organization/org-0")],
                               lenient=False, default_count=20, max_count=100)
    query.base_url = "http://testserver/fhir"
    driver = search_sql.choose_driver(conn, query)
    assert driver is not None  # 15 or 20 matches: both small
    walk = search_sql.choose_walk(conn, query, driver)
    assert walk is not None and walk.criterion == driver
    by_ids = search_query.parse("Task", [("status", "ready"), ("_id", "t1,t2")],
                               lenient=False, default_count=20, max_count=100)
    driver = search_sql.choose_driver(conn, by_ids)
    assert driver == 1  # two ids: driven, and an _id list has no ordered index to walk
    assert search_sql.choose_walk(conn, by_ids, driver) is None
