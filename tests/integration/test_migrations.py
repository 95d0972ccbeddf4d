"""The alembic migrations build exactly the schema the code declares, on both engines."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from gateway.store.database import Database
from gateway.store.migrate import upgrade
from gateway.store.schema import metadata


def test_migrated_database_matches_the_declared_schema(db: Database) -> None:
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_upgrade_is_idempotent(db: Database) -> None:
    upgrade(db.engine)
    tables = set(inspect(db.engine).get_table_names())
    assert {t.name for t in metadata.sorted_tables} <= tables
