"""priorities and fairness: batches.priority, tenants.weight, and an index of the queued jobs by batch

The dispatcher admits queued jobs by batch priority, then round robin across tenants (weighted by
``tenants.weight``), then across a tenant's batches (pipeline.flow.admission). It finds the batches
that have queued jobs, and each one's oldest, through ``ix_jobs_queued_batch_id``: partial, so only
queued jobs are in it, and a job leaves it when it is dispatched.

Both new columns have a constant default, so adding them rewrites no table.

Revision ID: e8b2d4f6a913
Revises: c4e1b7a9d302
Create Date: 2026-12-07 06:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'e8b2d4f6a913'
down_revision: str | None = 'c4e1b7a9d302'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = "status = 'queued'"
PRIORITY_CK = 'ck_batches_priority_range'
WEIGHT_CK = 'ck_tenants_weight_positive'


def upgrade() -> None:
    op.add_column('batches', sa.Column('priority', sa.SmallInteger(), server_default='5', nullable=False))
    op.add_column('tenants', sa.Column('weight', sa.Float(), server_default='1', nullable=False))
    if op.get_bind().dialect.name == 'postgresql':
        # SQLite (the embedded demo) adds a CHECK only by copying the table; the inputs are checked anyway.
        op.create_check_constraint(op.f(PRIORITY_CK), 'batches', sa.text('priority BETWEEN 0 AND 9'))
        op.create_check_constraint(op.f(WEIGHT_CK), 'tenants', sa.text('weight > 0'))
    op.create_index('ix_jobs_queued_batch_id', 'jobs', ['batch_id', 'id'],
                    postgresql_where=sa.text(QUEUED), sqlite_where=sa.text(QUEUED))


def downgrade() -> None:
    op.drop_index('ix_jobs_queued_batch_id', table_name='jobs')
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_constraint(op.f(PRIORITY_CK), 'batches', type_='check')
        op.drop_constraint(op.f(WEIGHT_CK), 'tenants', type_='check')
    with op.batch_alter_table('tenants') as batch:
        batch.drop_column('weight')
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('priority')
