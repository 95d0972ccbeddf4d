"""resource store: versions, history, search index, change log

Revision ID: 0001
Revises:
Create Date: 2026-11-22 21:56:12.334022
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('change_log',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('interaction', sa.String(length=16), nullable=False),
    sa.Column('at', sa.BigInteger(), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=True),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('seq')
    )
    op.create_table('conditional_keys',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('criteria_hash', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('criteria', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('res_type', 'criteria_hash')
    )
    op.create_table('resource_history',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('last_updated', sa.BigInteger(), nullable=False),
    sa.Column('method', sa.String(length=8), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('content', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('res_type', 'res_id', 'version')
    )
    with op.batch_alter_table('resource_history', schema=None) as batch_op:
        batch_op.create_index('ix_history_type_updated', ['res_type', 'last_updated'], unique=False)
        batch_op.create_index('ix_history_updated', ['last_updated'], unique=False)

    op.create_table('resources',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('last_updated', sa.BigInteger(), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('content', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('res_type', 'res_id')
    )
    with op.batch_alter_table('resources', schema=None) as batch_op:
        batch_op.create_index('ix_resources_type_updated', ['res_type', 'last_updated'], unique=False)

    op.create_table('sp_date',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('low', sa.BigInteger(), nullable=False),
    sa.Column('high', sa.BigInteger(), nullable=False)
    )
    with op.batch_alter_table('sp_date', schema=None) as batch_op:
        batch_op.create_index('ix_sp_date_0', ['res_type', 'param', 'low', 'high', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_date_1', ['res_type', 'param', 'high', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_date_resource', ['res_type', 'res_id'], unique=False)

    op.create_table('sp_number',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False)
    )
    with op.batch_alter_table('sp_number', schema=None) as batch_op:
        batch_op.create_index('ix_sp_number_0', ['res_type', 'param', 'value', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_number_resource', ['res_type', 'res_id'], unique=False)

    op.create_table('sp_quantity',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('system', sa.String(length=255), nullable=True),
    sa.Column('code', sa.String(length=255), nullable=True)
    )
    with op.batch_alter_table('sp_quantity', schema=None) as batch_op:
        batch_op.create_index('ix_sp_quantity_0', ['res_type', 'param', 'value', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_quantity_1', ['res_type', 'param', 'code', 'value', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_quantity_resource', ['res_type', 'res_id'], unique=False)

    op.create_table('sp_reference',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('target_type', sa.String(length=64), nullable=True),
    sa.Column('target_id', sa.String(length=255), nullable=True),
    sa.Column('url', sa.Text(), nullable=True)
    )
    with op.batch_alter_table('sp_reference', schema=None) as batch_op:
        batch_op.create_index('ix_sp_reference_0', ['res_type', 'param', 'target_id', 'target_type', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_reference_resource', ['res_type', 'res_id'], unique=False)

    op.create_table('sp_string',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=255), nullable=False),
    sa.Column('exact', sa.Text(), nullable=False)
    )
    with op.batch_alter_table('sp_string', schema=None) as batch_op:
        batch_op.create_index('ix_sp_string_0', ['res_type', 'param', 'value', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_string_resource', ['res_type', 'res_id'], unique=False)

    op.create_table('sp_token',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('system', sa.String(length=255), nullable=True),
    sa.Column('code', sa.String(length=255), nullable=True),
    sa.Column('text', sa.String(length=255), nullable=True)
    )
    with op.batch_alter_table('sp_token', schema=None) as batch_op:
        batch_op.create_index('ix_sp_token_0', ['res_type', 'param', 'code', 'system', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_token_resource', ['res_type', 'res_id'], unique=False)

    op.create_table('sp_uri',
    sa.Column('res_type', sa.String(length=64), nullable=False),
    sa.Column('res_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=1020), nullable=False)
    )
    with op.batch_alter_table('sp_uri', schema=None) as batch_op:
        batch_op.create_index('ix_sp_uri_0', ['res_type', 'param', 'value', 'res_id'], unique=False)
        batch_op.create_index('ix_sp_uri_resource', ['res_type', 'res_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('sp_uri', schema=None) as batch_op:
        batch_op.drop_index('ix_sp_uri_resource')
        batch_op.drop_index('ix_sp_uri_0')

    op.drop_table('sp_uri')
    with op.batch_alter_table('sp_token', schema=None) as batch_op:
        batch_op.drop_index('ix_sp_token_resource')
        batch_op.drop_index('ix_sp_token_0')

    op.drop_table('sp_token')
    with op.batch_alter_table('sp_string', schema=None) as batch_op:
        batch_op.drop_index('ix_sp_string_resource')
        batch_op.drop_index('ix_sp_string_0')

    op.drop_table('sp_string')
    with op.batch_alter_table('sp_reference', schema=None) as batch_op:
        batch_op.drop_index('ix_sp_reference_resource')
        batch_op.drop_index('ix_sp_reference_0')

    op.drop_table('sp_reference')
    with op.batch_alter_table('sp_quantity', schema=None) as batch_op:
        batch_op.drop_index('ix_sp_quantity_resource')
        batch_op.drop_index('ix_sp_quantity_1')
        batch_op.drop_index('ix_sp_quantity_0')

    op.drop_table('sp_quantity')
    with op.batch_alter_table('sp_number', schema=None) as batch_op:
        batch_op.drop_index('ix_sp_number_resource')
        batch_op.drop_index('ix_sp_number_0')

    op.drop_table('sp_number')
    with op.batch_alter_table('sp_date', schema=None) as batch_op:
        batch_op.drop_index('ix_sp_date_resource')
        batch_op.drop_index('ix_sp_date_1')
        batch_op.drop_index('ix_sp_date_0')

    op.drop_table('sp_date')
    with op.batch_alter_table('resources', schema=None) as batch_op:
        batch_op.drop_index('ix_resources_type_updated')

    op.drop_table('resources')
    with op.batch_alter_table('resource_history', schema=None) as batch_op:
        batch_op.drop_index('ix_history_updated')
        batch_op.drop_index('ix_history_type_updated')

    op.drop_table('resource_history')
    op.drop_table('conditional_keys')
    op.drop_table('change_log')
