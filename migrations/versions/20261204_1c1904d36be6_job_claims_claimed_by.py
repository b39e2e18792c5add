"""job claims: claimed_by

A claim names the worker process that holds it, as that worker's heartbeat in Redis names it. The
sweeper republishes the claims of a worker whose heartbeat has lapsed at once (a SIGKILLed worker's
jobs run again within seconds), and keeps the claim deadline as the fallback for claims whose
worker's heartbeat cannot be read.

Revision ID: 1c1904d36be6
Revises: 0299eae21a22
Create Date: 2026-12-04 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '1c1904d36be6'
down_revision: str | None = '0299eae21a22'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, and a claim taken before the upgrade names
    # no worker, so the claim deadline decides for it as before.
    op.add_column('jobs', sa.Column('claimed_by', sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'claimed_by')
