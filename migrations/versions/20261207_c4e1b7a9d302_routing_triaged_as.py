"""routing_decisions.triaged_as: the difficulty triage named, before the confidence threshold

A verdict below min_confidence is recorded as "ambiguous" (where it was routed), and what-if replay
(pipeline.quality.whatif) needs the difficulty triage saw to route it again under another threshold.
A nullable column: rows written before it keep NULL, and the replay falls back to the reason's text.

Revision ID: c4e1b7a9d302
Revises: a7d3f1c2b8e4
Create Date: 2026-12-07 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c4e1b7a9d302'
down_revision: str | None = 'a7d3f1c2b8e4'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('routing_decisions', sa.Column('triaged_as', sa.String(length=20), nullable=True))


def downgrade() -> None:
    op.drop_column('routing_decisions', 'triaged_as')
