"""the audit trail: one row per request, hash-chained

Every request's AuditEvent (IHE BALP) is a row of audit_log; the resources of rows naming
several are indexed in audit_entities; audit_chain holds the newest chained row's position and hash.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 08:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    seq = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "audit_log",
        sa.Column("seq", seq, primary_key=True, autoincrement=True),
        sa.Column("recorded", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(16), nullable=False),
        sa.Column("subtype", sa.String(32), nullable=False),
        sa.Column("action", sa.String(1), nullable=False),
        sa.Column("outcome", sa.String(2), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("client_id", sa.String(64), nullable=True),
        sa.Column("organization", sa.String(255), nullable=True),
        sa.Column("address", sa.String(255), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("query", sa.Text(), nullable=True),
        sa.Column("entity", sa.String(129), nullable=True),
        sa.Column("entities", sa.Text(), nullable=True),
        sa.Column("chain_seq", sa.BigInteger(), nullable=True),
        sa.Column("hash", sa.String(64), nullable=True),
    )
    op.create_index("ix_audit_log_recorded", "audit_log", ["recorded"])
    for column in ("entity", "client_id", "organization"):  # rows with a value only
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column, "seq"],
                        sqlite_where=sa.text(f"{column} IS NOT NULL"),
                        postgresql_where=sa.text(f"{column} IS NOT NULL"))
    op.create_index("ix_audit_log_chain", "audit_log", ["chain_seq"], unique=True)
    op.create_index("ix_audit_log_unchained", "audit_log", ["seq"],
                    sqlite_where=sa.text("chain_seq IS NULL"),
                    postgresql_where=sa.text("chain_seq IS NULL"))
    op.create_table(
        "audit_entities",
        sa.Column("reference", sa.String(129), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
    )
    chain = op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("chain_seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(chain, [{"id": 1, "chain_seq": 0, "hash": GENESIS}])


def downgrade() -> None:
    for table in ("audit_chain", "audit_entities", "audit_log"):
        op.drop_table(table)
