"""Rollups: per batch and tier (and minute) totals of the jobs and calls, folded by the dispatcher

`stats` and `batches` read them instead of every call of a batch (pipeline.queries.rollups).
jobs.rolled_up and model_calls.rolled_up mark what has been folded; rows written before this
revision start unfolded, and the dispatcher folds them a chunk at a time (or `switchyard db
rebuild-rollups` in one go).

Revision ID: e5f2a8c1d4b7
Revises: e8b2d4f6a913
Create Date: 2026-12-07 06:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'e5f2a8c1d4b7'
down_revision: str | None = 'e8b2d4f6a913'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNROLLED_JOBS = "NOT rolled_up AND status IN ('succeeded', 'failed', 'cancelled')"
FIGURES = ("jobs_succeeded", "jobs_failed", "jobs_cancelled", "job_escalations", "escalations", "worked",
           "validations", "validations_failed", "top_input_tokens", "top_output_tokens",
           "top_cache_creation_input_tokens", "top_cache_read_input_tokens", "calls", "failed_calls",
           "repeated_calls", "input_tokens", "output_tokens", "cache_creation_input_tokens",
           "cache_read_input_tokens")


def _figures() -> list[sa.Column]:
    return [*(sa.Column(name, sa.BigInteger(), server_default='0', nullable=False) for name in FIGURES),
            sa.Column('cost_usd', sa.Numeric(18, 8), server_default='0', nullable=False),
            sa.Column('repeated_cost_usd', sa.Numeric(18, 8), server_default='0', nullable=False),
            sa.Column('latency_histogram', sa.ARRAY(sa.BigInteger()).with_variant(sa.JSON(), 'sqlite'),
                      nullable=True)]


def upgrade() -> None:
    op.add_column('jobs', sa.Column('rolled_up', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.add_column('model_calls', sa.Column('rolled_up', sa.Boolean(), server_default=sa.text('false'),
                                           nullable=False))
    op.create_index('ix_jobs_unrolled', 'jobs', ['id'], postgresql_where=sa.text(UNROLLED_JOBS),
                    sqlite_where=sa.text(UNROLLED_JOBS))
    op.create_index('ix_model_calls_unrolled', 'model_calls', ['job_id'], postgresql_where=sa.text('NOT rolled_up'),
                    sqlite_where=sa.text('NOT rolled_up'))
    op.create_table(
        'rollup_totals',
        sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('tier', sa.String(length=40), nullable=False),
        *_figures(),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_rollup_totals_batch_id_batches'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id', 'tier', name=op.f('pk_rollup_totals')),
    )
    op.create_table(
        'rollup_minutes',
        sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('tier', sa.String(length=40), nullable=False),
        sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
        *_figures(),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_rollup_minutes_batch_id_batches'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id', 'tier', 'minute', name=op.f('pk_rollup_minutes')),
    )
    op.create_index('ix_rollup_minutes_minute', 'rollup_minutes', ['minute'])
    op.create_table(
        'rollup_failures',
        sa.Column('batch_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('reason_md5', sa.String(length=32), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('jobs', sa.BigInteger(), server_default='0', nullable=False),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_rollup_failures_batch_id_batches'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('batch_id', 'reason_md5', name=op.f('pk_rollup_failures')),
    )


def downgrade() -> None:
    op.drop_table('rollup_failures')
    op.drop_index('ix_rollup_minutes_minute', table_name='rollup_minutes')
    op.drop_table('rollup_minutes')
    op.drop_table('rollup_totals')
    op.drop_index('ix_model_calls_unrolled', table_name='model_calls')
    op.drop_index('ix_jobs_unrolled', table_name='jobs')
    with op.batch_alter_table('model_calls') as batch:
        batch.drop_column('rolled_up')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('rolled_up')
