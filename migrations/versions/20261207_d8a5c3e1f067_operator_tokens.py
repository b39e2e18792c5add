"""api_tokens.operator: a token that reads every tenant's work (the dashboard's operators)

A tenant's token sees only its tenant; an operator's token (`switchyard tokens create --operator`)
sees every tenant in the API's reads and the dashboard, and submits as its own tenant. Existing
tokens stay tenant tokens (server default false).

Revision ID: d8a5c3e1f067
Revises: e5f2a8c1d4b7
Create Date: 2026-12-07 06:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'd8a5c3e1f067'
down_revision: str | None = 'e5f2a8c1d4b7'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('api_tokens', sa.Column('operator', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    op.drop_column('api_tokens', 'operator')
