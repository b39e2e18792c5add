"""transient waits and failure reasons: jobs.not_before, jobs.transient_since, jobs.failure_reason

A stage whose call meets only transient errors (429, 529, 5xx, timeouts) until its attempts run out
no longer fails its job: it releases its claim and waits in Postgres until ``not_before``, when the
dispatcher publishes it again (so the wait survives a broker flush, and no message sits in Redis
for minutes). ``transient_since`` is when the stage began meeting only transient errors: the job
fails once that is longer ago than the patience (SWITCHYARD_TRANSIENT_PATIENCE_S).
``failure_reason`` is a failed job's reason in a few words, shared by the jobs that failed the same
way, which the summaries count (``report.failure_reasons``).

All three are nullable with no default: adding them rewrites nothing, and jobs in flight during the
upgrade read as not waiting. ``ix_jobs_not_before`` is partial (only waiting jobs are in it), built
CONCURRENTLY on Postgres so that the workers' writes to ``jobs`` go on during the build; a failed
build leaves an invalid index, which running the migration again drops and rebuilds.

Revision ID: b23c42dca0a1
Revises: 1c1904d36be6
Create Date: 2026-12-04 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b23c42dca0a1'
down_revision: str | None = '1c1904d36be6'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX, WHERE = "ix_jobs_not_before", "not_before IS NOT NULL"


def upgrade() -> None:
    op.add_column('jobs', sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('transient_since', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('failure_reason', sa.String(length=200), nullable=True))
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(INDEX, "jobs", ["not_before"], sqlite_where=sa.text(WHERE))
        return
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="jobs", if_exists=True, postgresql_concurrently=True)
        op.create_index(INDEX, "jobs", ["not_before"], postgresql_where=sa.text(WHERE), postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="jobs")
    op.drop_column('jobs', 'failure_reason')
    op.drop_column('jobs', 'transient_since')
    op.drop_column('jobs', 'not_before')
