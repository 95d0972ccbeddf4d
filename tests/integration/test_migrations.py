"""The alembic migrations build exactly the schema the code declares, on both engines,
and carry existing data forward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from gateway.settings import Settings
from gateway.store.database import Database, make_engine
from gateway.store.migrate import alembic_config, upgrade
from gateway.store.schema import metadata
from tests.conftest import private_pg_schema


def test_migrated_database_matches_the_declared_schema(db: Database) -> None:
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_upgrade_is_idempotent(db: Database) -> None:
    upgrade(db.engine)
    tables = set(inspect(db.engine).get_table_names())
    assert {t.name for t in metadata.sorted_tables} <= tables


@pytest.fixture(params=["sqlite", "postgres"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a store no migration has touched yet, on each backend."""
    if request.param == "sqlite":
        engine = make_engine(Settings(database_url=f"sqlite:///{tmp_path / 'old.db'}"))
        yield engine
        engine.dispose()
        return
    with private_pg_schema("atm_old") as url:
        engine = make_engine(Settings(database_url=url))
        yield engine
        engine.dispose()


def test_index_rows_written_before_0002_get_their_resources_last_updated(
        empty_engine: Engine) -> None:
    config = alembic_config()
    with empty_engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(text(
            "INSERT INTO resources (res_type, res_id, version, last_updated, deleted, content)"
            " VALUES ('Task', 't1', 1, 1700000000000000, false, '{}')"))
        conn.execute(text("INSERT INTO sp_token (res_type, res_id, param, system, code)"
                          " VALUES ('Task', 't1', 'status', NULL, 'ready')"))
        conn.execute(text("INSERT INTO sp_reference (res_type, res_id, param, target_type,"
                          " target_id) VALUES ('Task', 't1', 'owner', 'Organization', 'o1')"))
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        for table in ("sp_token", "sp_reference"):
            stamped = conn.execute(text(f"SELECT last_updated FROM {table}")).scalar_one()
            assert stamped == 1_700_000_000_000_000
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_0002_can_be_undone(empty_engine: Engine) -> None:
    config = alembic_config()
    with empty_engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        command.downgrade(config, "0001")
    inspector = inspect(empty_engine)
    for table in ("sp_token", "sp_reference", "sp_date"):
        assert "last_updated" not in {c["name"] for c in inspector.get_columns(table)}
    lookups = {i["name"]: i["column_names"] for i in inspector.get_indexes("sp_token")}
    assert lookups["ix_sp_token_0"] == ["res_type", "param", "code", "system", "res_id"]
    assert "ix_sp_token_resource" in lookups
