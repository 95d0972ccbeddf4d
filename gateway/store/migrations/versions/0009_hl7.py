"""HL7 v2 bridge: every message received from or sent to a LIMS, kept with its raw text

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "hl7_messages",
        sa.Column("id", SEQ, primary_key=True, autoincrement=True),
        sa.Column("direction", sa.String(3), nullable=False),
        sa.Column("control_id", sa.String(199), nullable=True),
        sa.Column("application", sa.String(255), nullable=False),
        sa.Column("facility", sa.String(255), nullable=False),
        sa.Column("message_type", sa.String(16), nullable=True),
        sa.Column("coi", sa.String(32), nullable=True),
        sa.Column("source", sa.String(129), nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("ack", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
    )
    op.create_index("ux_hl7_messages_control_id", "hl7_messages", ["direction", "application", "facility", "control_id"], unique=True)
    op.create_index("ux_hl7_messages_source", "hl7_messages", ["source"], unique=True)
    op.create_index("ix_hl7_messages_due", "hl7_messages", ["direction", "status", "next_attempt"])


def downgrade() -> None:
    op.drop_table("hl7_messages")
