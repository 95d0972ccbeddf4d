"""cursors of the processes that react to the change log

The orchestrator (and later subscription delivery) reads the change log after commit and
keeps how far it got here, so a restart resumes where it stopped.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 06:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reactor_cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reactor_cursors")
