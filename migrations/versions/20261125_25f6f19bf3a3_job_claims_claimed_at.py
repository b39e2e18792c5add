"""job claims: claimed_at

A worker that begins a stage claims the job (claimed_at) and renews the claim before each call
attempt. The sweeper republishes a stale claim after a short deadline (the worker died) and an
unclaimed stage only after the long one (its message may just be waiting in a queue); begin_stage
refuses a stage that a live worker holds, so duplicate messages cost no duplicate calls.

Revision ID: 25f6f19bf3a3
Revises: 6ef84f92384f
Create Date: 2026-11-25 20:34:05.590906
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '25f6f19bf3a3'
down_revision: str | None = '6ef84f92384f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, and jobs in flight during the upgrade read
    # as unclaimed, which at worst republishes them once (duplicates are harmless).
    op.add_column('jobs', sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'claimed_at')
