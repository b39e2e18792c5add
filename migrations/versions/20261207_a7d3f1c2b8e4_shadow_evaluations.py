"""shadow evaluations: shadow_evaluations, batches.shadow_rate, model_calls stages shadow and judge

A sampled share of the jobs that succeed below the reference tier is worked again by that tier and
the answers compared (pipeline.flow.shadow). ``shadow_evaluations`` holds one row per sampled job,
written with the job's success, so the sample is on record before any shadow call is made.
``batches.shadow_rate`` is a batch's own rate (NULL: the task's or the configuration's). The
shadow's calls are ``model_calls`` rows of the stages ``shadow`` and ``judge``, which the stage
column's CHECK must now allow.

Every new column is nullable or has a constant default, so adding it rewrites no table.

Revision ID: a7d3f1c2b8e4
Revises: 5fdaa5cb2a17
Create Date: 2026-12-07 03:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'a7d3f1c2b8e4'
down_revision: str | None = '5fdaa5cb2a17'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
Money = sa.Numeric(14, 8)
STAGE_CK = 'ck_model_calls_stage'
OLD_STAGES = ('triage', 'work', 'format_check')
NEW_STAGES = (*OLD_STAGES, 'shadow', 'judge')
OPEN = "status IN ('pending', 'working', 'judging')"


def _stages(values: tuple[str, ...]) -> str:
    return "stage IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _set_stages(values: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table('model_calls') as batch:  # SQLite changes a CHECK only by copying the table
            batch.drop_constraint(op.f(STAGE_CK), type_='check')
            batch.create_check_constraint('stage', sa.text(_stages(values)))
        return
    op.execute(f"ALTER TABLE model_calls DROP CONSTRAINT {STAGE_CK}")
    # NOT VALID, then VALIDATE on its own: checking the existing rows then does not block the
    # workers' writes to model_calls for a scan of the whole table.
    op.execute(f"ALTER TABLE model_calls ADD CONSTRAINT {STAGE_CK} CHECK ({_stages(values)}) NOT VALID")
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE model_calls VALIDATE CONSTRAINT {STAGE_CK}")


def upgrade() -> None:
    op.create_table(
        'shadow_evaluations',
        sa.Column('id', BigId, nullable=False),
        sa.Column('job_id', BigId, nullable=False),
        sa.Column('status', sa.Enum('pending', 'working', 'judging', 'done', 'failed', name='status',
                                    native_enum=False, create_constraint=True, length=20), nullable=False),
        sa.Column('version', sa.Integer(), server_default='0', nullable=False),
        sa.Column('rate', sa.Float(), nullable=False),
        sa.Column('draw', sa.Float(), nullable=False),
        sa.Column('routed_tier', sa.String(length=40), nullable=False),
        sa.Column('difficulty', sa.String(length=20), nullable=True),
        sa.Column('reference_tier', sa.String(length=40), nullable=False),
        sa.Column('judge_tier', sa.String(length=40), nullable=True),
        sa.Column('deliveries', sa.Integer(), server_default='0', nullable=False),
        sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
        sa.Column('reference_answer', sa.Text(), nullable=True),
        sa.Column('agreement', sa.Float(), nullable=True),
        sa.Column('agreed', sa.Boolean(), nullable=True),
        sa.Column('fields_total', sa.Integer(), nullable=True),
        sa.Column('fields_equal', sa.Integer(), nullable=True),
        sa.Column('judge_reason', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('cost_usd', Money, server_default='0', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_shadow_evaluations_job_id_jobs'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_shadow_evaluations')),
        sa.UniqueConstraint('job_id', name=op.f('uq_shadow_evaluations_job_id')),
    )
    op.create_index('ix_shadow_evaluations_open', 'shadow_evaluations', ['updated_at'],
                    postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))
    op.add_column('batches', sa.Column('shadow_rate', sa.Float(), nullable=True))
    _set_stages(NEW_STAGES)


def downgrade() -> None:
    op.execute("DELETE FROM model_calls WHERE stage IN ('shadow', 'judge')")
    _set_stages(OLD_STAGES)
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('shadow_rate')
    op.drop_index('ix_shadow_evaluations_open', table_name='shadow_evaluations')
    op.drop_table('shadow_evaluations')
