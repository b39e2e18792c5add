"""economy mode: batches.mode, jobs.economy_note, model_calls.message_batch_id, message_batches,
economy_requests

Economy mode makes a batch's model calls through the Message Batches API (pipeline.flow.economy).
The message batches are recorded before and after they are created at the API, and every call as
a request row keyed by its job's version, so a dispatcher restart neither loses nor repeats one.
Every new column is nullable: rows written before keep NULL (standard mode, no message batch).

Revision ID: e5c0a3b9d417
Revises: d8a5c3e1f067
Create Date: 2026-12-07 06:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'e5c0a3b9d417'
down_revision: str | None = 'd8a5c3e1f067'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column('batches', sa.Column('mode', sa.String(length=20), nullable=True))
    op.add_column('jobs', sa.Column('economy_note', sa.Text(), nullable=True))
    op.add_column('model_calls', sa.Column('message_batch_id', sa.String(length=100), nullable=True))
    op.create_table(
        'message_batches',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column('api_id', sa.String(length=100), nullable=True),
        sa.Column('model', sa.String(length=100), nullable=False),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('counts', _JSON, nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('polled_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('api_id'),
    )
    op.create_index('ix_message_batches_open', 'message_batches', ['state'],
                    postgresql_where=sa.text("state IN ('creating', 'in_progress')"),
                    sqlite_where=sa.text("state IN ('creating', 'in_progress')"))
    op.create_table(
        'economy_requests',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column('job_version', sa.Integer(), nullable=False),
        sa.Column('purpose', sa.String(length=20), nullable=False),
        sa.Column('tier', sa.String(length=40), nullable=False),
        sa.Column('model', sa.String(length=100), nullable=False),
        sa.Column('round', sa.Integer(), server_default='1', nullable=False),
        sa.Column('state', sa.String(length=20), nullable=False),
        sa.Column('params', _JSON, nullable=False),
        sa.Column('custom_id', sa.String(length=64), nullable=True),
        sa.Column('message_batch_id', sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column('result_type', sa.String(length=20), nullable=True),
        sa.Column('result', _JSON, nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('result_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('consumed_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['message_batch_id'], ['message_batches.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('custom_id'),
    )
    op.create_index('ix_economy_requests_job', 'economy_requests', ['job_id', 'job_version', 'purpose'])
    op.create_index('ix_economy_requests_pending', 'economy_requests', ['model', 'id'],
                    postgresql_where=sa.text("state = 'pending'"), sqlite_where=sa.text("state = 'pending'"))
    op.create_index('ix_economy_requests_batch', 'economy_requests', ['message_batch_id'])
    op.create_index('ix_economy_requests_unread', 'economy_requests', ['job_id'],
                    postgresql_where=sa.text("state = 'done' AND consumed_at IS NULL"),
                    sqlite_where=sa.text("state = 'done' AND consumed_at IS NULL"))


def downgrade() -> None:
    op.drop_index('ix_economy_requests_unread', table_name='economy_requests')
    op.drop_index('ix_economy_requests_batch', table_name='economy_requests')
    op.drop_index('ix_economy_requests_pending', table_name='economy_requests')
    op.drop_index('ix_economy_requests_job', table_name='economy_requests')
    op.drop_table('economy_requests')
    op.drop_index('ix_message_batches_open', table_name='message_batches')
    op.drop_table('message_batches')
    op.drop_column('model_calls', 'message_batch_id')
    op.drop_column('jobs', 'economy_note')
    op.drop_column('batches', 'mode')
