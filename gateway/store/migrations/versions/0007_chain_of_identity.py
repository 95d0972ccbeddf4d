"""chain of identity: the codes assigned to enrolments and their sequence numbers

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 15:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chains_of_identity",
        sa.Column("value", sa.String(16), primary_key=True),
        sa.Column("careplan_id", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("assigned_at", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "coi_sequences",
        sa.Column("facility", sa.String(8), primary_key=True),
        sa.Column("year", sa.Integer(), primary_key=True),
        sa.Column("last", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("coi_sequences")
    op.drop_table("chains_of_identity")
