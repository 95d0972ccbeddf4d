"""search-index rows carry their resource's lastUpdated

A search sorted by _lastUpdated (the default) can then walk one criterion's matches in
that order through the token and reference indexes, instead of walking every resource
of the type: at a million Tasks, a worklist search no longer slows with the table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 03:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

INDEX_TABLES = ("sp_string", "sp_token", "sp_reference", "sp_date", "sp_number",
                "sp_quantity", "sp_uri")
# (table, old lookup index columns, new lookup index columns), all after (res_type, param)
REORDERED = (
    ("sp_token", ["code", "system", "res_id"], ["code", "last_updated", "res_id", "system"]),
    ("sp_reference", ["target_id", "target_type", "res_id"],
     ["target_id", "target_type", "last_updated", "res_id"]),
)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table in INDEX_TABLES:
        # NOT NULL needs a default for the rows already there (SQLite insists); the
        # server always writes the value itself, so PostgreSQL drops it again.
        op.add_column(table, sa.Column("last_updated", sa.BigInteger(), nullable=False,
                                       server_default="0"))
        op.execute(f"UPDATE {table} SET last_updated = (SELECT r.last_updated "
                   f"FROM resources r WHERE r.res_type = {table}.res_type "
                   f"AND r.res_id = {table}.res_id)")
        if postgres:
            op.alter_column(table, "last_updated", server_default=None)
    for table, _, columns in REORDERED:
        op.drop_index(f"ix_{table}_0", table_name=table)
        op.create_index(f"ix_{table}_0", table, ["res_type", "param", *columns])


def downgrade() -> None:
    for table, columns, _ in REORDERED:
        op.drop_index(f"ix_{table}_0", table_name=table)
        op.create_index(f"ix_{table}_0", table, ["res_type", "param", *columns])
    for table in INDEX_TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("last_updated")
