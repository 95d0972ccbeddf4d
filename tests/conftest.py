"""Fixtures: every storage and API test runs on SQLite and, when ATM_TEST_POSTGRES_URL is
set, on a real PostgreSQL (each test in a fresh schema state)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import Connection, create_engine, text

from gateway.app import create_app
from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from gateway.store.migrate import upgrade
from gateway.store.schema import metadata

PG_URL = os.environ.get("ATM_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "postgres"]
SLOW_TESTS = os.environ.get("ATM_SLOW_TESTS") == "1"
"""Soak and scale tests (marked slow) run at full size; otherwise at a bounded size that
still proves the point, so that `make test` stays within 10 minutes on 2 cores."""


@cache
def _environment_settings() -> Settings:
    return Settings()


def settings_with(**values: Any) -> Settings:
    """Settings as the environment gives them, with these values: the environment is read
    once per session (pydantic-settings takes ~20 ms to read it, which every test paid)."""
    return _environment_settings().model_copy(update=values)


def pytest_report_header(config: pytest.Config) -> list[str]:
    slow = ("slow tests: full size (ATM_SLOW_TESTS=1)" if SLOW_TESTS else
            "slow tests: bounded (set ATM_SLOW_TESTS=1 for full size)")
    if PG_URL:
        return [f"PostgreSQL tests: on ({PG_URL})", slow]
    return ["PostgreSQL tests: SKIPPED (set ATM_TEST_POSTGRES_URL to run them)", slow]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies (migrating once is faster)."""
    path = tmp_path_factory.mktemp("template") / "atm.db"
    engine = make_engine(Settings(database_url=f"sqlite:///{path}"))
    upgrade(engine)
    engine.dispose()
    return path


@contextmanager
def private_pg_schema(prefix: str) -> Iterator[str]:
    """The URL of a new, empty schema on the test server (skips without one), dropped
    afterwards."""
    if not PG_URL:
        pytest.skip("PostgreSQL not configured: set ATM_TEST_POSTGRES_URL")
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[str]:
    """A private schema on the test server, migrated once, dropped at the end."""
    with private_pg_schema("atm_test") as url:
        engine = make_engine(Settings(database_url=url))
        upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(scope="session")
def pg_reset(pg_schema_url: str) -> Iterator[Callable[[], None]]:
    """Empties the session's schema as TRUNCATE ... RESTART IDENTITY of every table would,
    truncating only the tables something was written to since: a test writes to a few of
    them, and truncating all of them (each table's and index's files replaced) took ~0.1 s
    per test, over 800 tests. A table whose file is still empty holds nothing and needs
    nothing. DELETE would be faster still, but it leaves dead rows behind (autovacuum may
    be off): PostgreSQL then plans on bloated tables, which a plan test caught."""
    engine = make_engine(Settings(database_url=pg_schema_url))
    ours = [table.name for table in metadata.sorted_tables]
    # Written to: its file holds a row, a dead one or a rolled-back one, or a sequence of
    # its has been drawn from (a failed insert may draw one and write nothing).
    written = text("""
        SELECT t.relname FROM pg_class t
        WHERE t.relnamespace = current_schema()::regnamespace AND t.relkind = 'r'
            AND t.relname = ANY(:ours)
            AND (pg_relation_size(t.oid) > 0 OR EXISTS (
                SELECT 1 FROM pg_depend d
                JOIN pg_class s ON s.oid = d.objid
                JOIN pg_sequences q ON q.schemaname = current_schema()
                    AND q.sequencename = s.relname
                WHERE d.refobjid = t.oid AND d.classid = 'pg_class'::regclass
                    AND d.deptype IN ('a', 'i') AND q.last_value IS NOT NULL))""")

    def reset() -> None:
        with engine.begin() as conn:
            names = ", ".join(f'"{name}"' for name in conn.execute(written, {"ours": ours})
                              .scalars())
            if names:
                conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))

    yield reset
    engine.dispose()


def analyze_store(conn: Connection) -> None:
    """PostgreSQL statistics of the store's tables, as autovacuum would keep them. Named
    one by one: a bare ANALYZE takes every table of the database, other test sessions'
    schemas included, and deadlocks with their resets (TRUNCATE)."""
    conn.exec_driver_sql("ANALYZE " + ", ".join(f'"{t.name}"' for t in metadata.sorted_tables))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of a fresh, migrated store on each backend."""
    if request.param == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        target = tmp_path / "atm.db"
        shutil.copy(template, target)
        return f"sqlite:///{target}"
    url: str = request.getfixturevalue("pg_schema_url")
    request.getfixturevalue("pg_reset")()
    return url


@pytest.fixture
def settings(database_url: str) -> Settings:
    # The orchestrator, subscription delivery, EHR sync, the shipped protocols and topics
    # are started by the tests that use them.
    # Most tests exercise FHIR behaviour, not access: authentication is off unless a test
    # turns it on (client_with(settings, auth="smart")).
    return settings_with(database_url=database_url, base_url="http://testserver/fhir",
                         max_body_bytes=1_000_000, log_json=False, orchestrator=False,
                         load_protocols=False, subscriptions=False, load_topics=False,
                         ehr_sync=False, auth="off")


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(make_engine(settings))
    yield database
    database.dispose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, migrate=False)
    with TestClient(app) as test_client:
        yield test_client


@contextmanager
def client_with(settings: Settings, **overrides: Any) -> Iterator[TestClient]:
    """A client of a server whose settings differ from the test's in `overrides`."""
    app = create_app(settings.model_copy(update=overrides), migrate=False)
    with TestClient(app) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_server(database_url: str) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in a thread; yields its FHIR base URL."""
    with running_server(database_url) as base:
        yield base


@contextmanager
def running_server(database_url: str, port: int | None = None,
                   **overrides: Any) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 in a thread (on `port`, else a free one),
    without the orchestrator or authentication unless `overrides` says otherwise; yields
    its FHIR base URL."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    settings = settings_with(database_url=database_url, base_url=base, log_json=False,
                             **{"orchestrator": False, "load_protocols": False, "auth": "off",
                                "subscriptions": False, "load_topics": False,
                                "ehr_sync": False, **overrides})
    config = uvicorn.Config(create_app(settings, migrate=False), host="127.0.0.1", port=port,
                            log_level="warning", loop="asyncio", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(params=["driven", "walked"])
def search_plan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way a search can run: from its most selective criterion's ids ("driven"),
    or through every resource in sort order ("walked", what unselective criteria get).
    Use with `pytestmark = pytest.mark.usefixtures("search_plan")`."""
    if request.param == "walked":
        from gateway.store import search_sql

        monkeypatch.setattr(search_sql, "DRIVER_LIMIT", 0)
        monkeypatch.setattr(search_sql, "SORTED_DRIVER_LIMIT", 0)
    return str(request.param)
