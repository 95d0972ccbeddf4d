"""The write path's statements, run on the database driver itself.

A create runs about eight statements (current row, history, change log, one per index
table). Through SQLAlchemy's `Connection.execute` each costs ~40 µs of parameter
processing, events and result set-up before the driver sees it: more than SQLite takes
to insert the row. These few fixed statements therefore go to the DBAPI cursor of the
caller's SQLAlchemy connection, inside its transaction; everything else stays in
SQLAlchemy. Driver errors are re-raised as SQLAlchemy's exceptions, so callers (deadlock
replay, transient-error answers) see one family either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import Connection, Table
from sqlalchemy.exc import DBAPIError

from gateway.store.schema import INDEX_TABLES, change_log, resource_history, resources

_PLACEHOLDER = {"sqlite": "?", "postgresql": "%s"}
CURRENT_COLUMNS = ("res_type", "res_id", "version", "last_updated", "deleted", "content")


def _insert(table: Table, mark: str, tail: str = "") -> tuple[str, tuple[str, ...]]:
    """INSERT of every column but an auto-incremented key, and the column order."""
    columns = tuple(c.name for c in table.columns
                    if not (c.primary_key and c.autoincrement is True))
    marks = ", ".join([mark] * len(columns))
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks}){tail}", columns


@dataclass(frozen=True)
class Statements:
    """The write path's SQL in one dialect's parameter style."""

    read: str
    insert_current: str
    replace_current: str
    insert_history: str
    insert_change: str
    insert_index: dict[str, tuple[str, tuple[str, ...]]]
    """kind -> (INSERT, columns after res_type, res_id and last_updated)"""
    delete_index: dict[str, str]
    mark: str
    """The dialect's parameter placeholder."""
    referring: str
    """(res_id, target_id) of one type's resources whose reference parameter points at
    one local target: the lookup index's (type, param, target) prefix."""
    referred_by: str
    """target_id of some resources' reference parameter (`{ids}`: their placeholders),
    through the per-resource index (SQLite without statistics would otherwise scan the
    parameter's whole range)."""
    changes_after: str
    """The change log after a seq, in order, at most a limit (the columns of Change)."""


@cache
def statements(dialect: str) -> Statements:
    m = _PLACEHOLDER[dialect]
    key = f"res_type = {m} AND res_id = {m}"
    index = {}
    for kind, table in INDEX_TABLES.items():
        sql, columns = _insert(table, m)
        assert columns[:3] == ("res_type", "res_id", "last_updated")
        index[kind] = (sql, columns[3:])
    return Statements(
        read=f"SELECT {', '.join(CURRENT_COLUMNS)} FROM resources WHERE {key}",
        # A racing creator of the same id makes this insert nothing (no error, no abort):
        # its rowcount tells (RETURNING cost SQLite ~6–15 µs an insert more).
        insert_current=_insert(resources, m, " ON CONFLICT DO NOTHING")[0],
        replace_current=(f"UPDATE resources SET version = {m}, last_updated = {m}, "
                         f"deleted = {m}, content = {m} WHERE {key} AND version = {m}"),
        insert_history=_insert(resource_history, m)[0],
        insert_change=_insert(change_log, m)[0],
        insert_index=index,
        delete_index={kind: f"DELETE FROM {table.name} WHERE {key}"
                      for kind, table in INDEX_TABLES.items()},
        referring=(f"SELECT res_id, target_id FROM sp_reference WHERE res_type = {m} AND "
                   f"param = {m} AND target_id = {m} AND target_type = {m}"),
        referred_by=(
            "SELECT DISTINCT target_id FROM sp_reference"
            + (" INDEXED BY ix_sp_reference_resource" if dialect == "sqlite" else "")
            + f" WHERE res_type = {m} AND res_id IN ({{ids}}) AND param = {m}"
            + f" AND target_type = {m}"),
        changes_after=(f"SELECT {', '.join(Change._fields)} FROM change_log WHERE seq > {m} "
                       f"ORDER BY seq LIMIT {m}"),
        mark=m,
    )


class Change(NamedTuple):
    """A change-log row, as the reactors to the change log read it."""

    seq: int
    res_type: str
    res_id: str
    version: int
    interaction: str
    at: int
    actor: str | None
    request_id: str | None


def changes_after(conn: Connection, after: int, limit: int) -> list[Change]:
    """The changes after seq `after`, oldest first, at most `limit`. Reactors read them
    after every commit; through SQLAlchemy's select each reading cost them ~100 µs more."""
    driver = Driver(conn)
    rows = driver.execute(driver.sql.changes_after, (after, limit)).fetchall()
    return [Change._make(row) for row in rows]


class Driver:
    """Runs the write path's statements on a SQLAlchemy connection's DBAPI cursor."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.sql = statements(conn.dialect.name)
        self._cursor: Any = None

    def _cur(self) -> Any:
        if self._cursor is None:
            self._cursor = self._conn.connection.cursor()
        return self._cursor

    def execute(self, sql: str, params: Sequence[Any]) -> Any:
        """Run one statement; the cursor, for its rows or rowcount."""
        try:
            cursor = self._cur()
            cursor.execute(sql, params)
            return cursor
        except self._conn.dialect.loaded_dbapi.Error as exc:
            raise self._translated(exc, sql, params) from exc

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self._cur().executemany(sql, rows)
        except self._conn.dialect.loaded_dbapi.Error as exc:
            raise self._translated(exc, sql, rows) from exc

    def _translated(self, exc: Exception, sql: str, params: Any) -> DBAPIError:
        dbapi = self._conn.dialect.loaded_dbapi
        return DBAPIError.instance(sql, params, exc, dbapi.Error,
                                   dialect=self._conn.dialect)  # type: ignore[return-value]
