"""parked jobs: jobs.parked, set while a job waits for an economy call's message batch

Such a job waits in Postgres (not_before) for as long as its message batch takes, hours with the
real API, holding no message, no worker thread and no place in the broker. The dispatcher's
admission no longer counts it in flight (pipeline.flow.admission.in_flight), so an economy batch's
waiting jobs do not take every place from the other batches, and its message batches can grow past
``max_in_flight`` requests. ``status`` no longer shows it as retrying.

A constant default: adding the column rewrites no table (PostgreSQL 11 and later).

Revision ID: f1c3e5a7b902
Revises: a3f7c2d9e815
Create Date: 2026-12-07 10:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'f1c3e5a7b902'
down_revision: str | None = 'a3f7c2d9e815'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('parked', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    # Jobs already parked when this runs (an hour's not_before at most, PARK_S): those with an
    # unread request for their current version.
    op.execute("UPDATE jobs SET parked = true WHERE not_before IS NOT NULL AND EXISTS (SELECT 1 FROM economy_requests r "
               "WHERE r.job_id = jobs.id AND r.job_version = jobs.version AND r.consumed_at IS NULL)")


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:  # SQLite drops a column only by copying the table
        batch.drop_column('parked')
