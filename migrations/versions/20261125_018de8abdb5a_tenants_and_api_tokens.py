"""tenants and api tokens; batches belong to a tenant

Batch names become unique per tenant instead of globally. Batches enqueued from the CLI keep a NULL
tenant (the operator's own) and a partial unique index keeps their names unique among themselves.
The ``batches`` changes go through ``batch_alter_table`` so that SQLite (the demo) can apply them.

Revision ID: 018de8abdb5a
Revises: 33390e351dd8
Create Date: 2026-11-25 20:32:13.674887
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '018de8abdb5a'
down_revision: str | None = '33390e351dd8'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'tenants',
        sa.Column('id', BigId, nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('max_jobs_in_flight', sa.Integer(), nullable=True),
        sa.Column('max_spend_per_day_usd', sa.Numeric(precision=14, scale=8), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
        sa.UniqueConstraint('name', name=op.f('uq_tenants_name')),
    )
    op.create_table(
        'api_tokens',
        sa.Column('id', BigId, nullable=False),
        sa.Column('tenant_id', BigId, nullable=False),
        sa.Column('prefix', sa.String(length=20), nullable=False),
        sa.Column('secret_sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_tokens_tenant_id_tenants'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
        sa.UniqueConstraint('prefix', name=op.f('uq_api_tokens_prefix')),
    )
    op.create_index(op.f('ix_api_tokens_tenant_id'), 'api_tokens', ['tenant_id'], unique=False)
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('tenant_id', BigId, nullable=True))
        batch.drop_constraint(op.f('uq_batches_name'), type_='unique')
        batch.create_unique_constraint(op.f('uq_batches_tenant_id_name'), ['tenant_id', 'name'])
        batch.create_foreign_key(op.f('fk_batches_tenant_id_tenants'), 'tenants', ['tenant_id'], ['id'],
                                 ondelete='RESTRICT')
    op.create_index('uq_batches_name_no_tenant', 'batches', ['name'], unique=True,
                    postgresql_where=sa.text('tenant_id IS NULL'), sqlite_where=sa.text('tenant_id IS NULL'))


def downgrade() -> None:
    # Fails if two tenants have batches of the same name: rename or delete them first.
    op.drop_index('uq_batches_name_no_tenant', table_name='batches')
    with op.batch_alter_table('batches') as batch:
        batch.drop_constraint(op.f('fk_batches_tenant_id_tenants'), type_='foreignkey')
        batch.drop_constraint(op.f('uq_batches_tenant_id_name'), type_='unique')
        batch.create_unique_constraint(op.f('uq_batches_name'), ['name'])
        batch.drop_column('tenant_id')
    op.drop_index(op.f('ix_api_tokens_tenant_id'), table_name='api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('tenants')
