"""EHR endpoints the gateway is a client of, and the changes they refused

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 18:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ehr_endpoints",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("client_id", sa.String(255), nullable=False),
        sa.Column("private_jwk", sa.Text(), nullable=False),
        sa.Column("organization", sa.String(255), nullable=False),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "ehr_rejections",
        sa.Column("id", SEQ, primary_key=True, autoincrement=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("reference", sa.String(255), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_ehr_rejections_endpoint", "ehr_rejections", ["endpoint", "seq"])


def downgrade() -> None:
    op.drop_table("ehr_rejections")
    op.drop_table("ehr_endpoints")
