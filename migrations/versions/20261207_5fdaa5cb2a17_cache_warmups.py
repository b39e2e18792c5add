"""cache_warmups: which cached prompt prefixes are warm, and who is warming one

A call with a cache_control breakpoint writes its prefix to the model's cache; the calls fired
beside it, before its answer, all miss and write it again. One row per model and prefix lets one
call at a time, across every worker, warm it (a lease taken by a conditional update), and tells
the others when it is warm (pipeline.flow.warmup). A new table: nothing existing is touched.

Revision ID: 5fdaa5cb2a17
Revises: 5c0e7a1d2b94
Create Date: 2026-12-07 03:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '5fdaa5cb2a17'
down_revision: str | None = '5c0e7a1d2b94'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'cache_warmups',
        sa.Column('model', sa.String(length=100), nullable=False),
        sa.Column('prefix_sha256', sa.String(length=64), nullable=False),
        sa.Column('warm_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('lease_token', sa.String(length=32), nullable=True),
        sa.Column('leased_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('model', 'prefix_sha256', name=op.f('pk_cache_warmups')),
    )


def downgrade() -> None:
    op.drop_table('cache_warmups')
