"""multi-step scheduling: slots as the chain search reads them, and what claims them

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 18:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "schedule_slots",
        sa.Column("slot_id", sa.String(64), primary_key=True),
        sa.Column("schedule_id", sa.String(64), nullable=False),
        sa.Column("service", sa.String(255), nullable=True),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("end", sa.BigInteger(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("booked", sa.Integer(), nullable=False),
        sa.Column("open", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_schedule_slots_service_start", "schedule_slots", ["service", "start"])
    op.create_index("ix_schedule_slots_schedule", "schedule_slots", ["schedule_id"])
    op.create_table(
        "schedule_claims",
        sa.Column("id", SEQ, primary_key=True, autoincrement=True),
        sa.Column("slot_id", sa.String(64), nullable=True),
        sa.Column("service", sa.String(255), nullable=True),
        sa.Column("appointment_id", sa.String(64), nullable=True),
        sa.Column("hold_id", sa.String(64), nullable=True),
        sa.Column("careplan_id", sa.String(64), nullable=True),
        sa.Column("patient", sa.String(255), nullable=True),
        sa.Column("organization", sa.String(255), nullable=True),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("end", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_schedule_claims_slot", "schedule_claims", ["slot_id"])
    op.create_index("ix_schedule_claims_appointment", "schedule_claims", ["appointment_id"])
    op.create_index("ix_schedule_claims_hold", "schedule_claims", ["hold_id"])
    op.create_index("ix_schedule_claims_patient", "schedule_claims", ["patient", "start"])
    op.create_index("ix_schedule_claims_service", "schedule_claims", ["service", "start"])


def downgrade() -> None:
    op.drop_table("schedule_claims")
    op.drop_table("schedule_slots")
