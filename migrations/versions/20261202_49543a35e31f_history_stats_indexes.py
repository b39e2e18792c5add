"""history stats indexes: jobs of a tier in a time window, and the per-tier stats of a batch

Three partial indexes, each for one query (measured on 1,000,000 jobs, ``python -m bench history``):

- ``ix_jobs_tier_created_at`` (tier, created_at) WHERE tier IS NOT NULL: ``history.list_jobs`` with
  ``tier`` and a time window (``jobs list --tier opus --since ... --until ...``). The window's id
  range (``history._filtered``) bounds the primary key and this index hands over exactly the
  tier's rows inside the window; without it the heap filter threw away the other tiers' rows.
- ``ix_routing_decisions_escalation_job_id`` (job_id) WHERE reason_kind = 'escalation':
  ``report.summarize`` counts a batch's escalations per tier from it, reading only escalations
  (the triage decision of every job is not in it).
- ``ix_model_calls_work_job_id`` (job_id) WHERE stage = 'work': ``report.summarize``'s "each job's
  last successful work call" (the top-tier comparison) reads only work calls, not the triage
  and format-check calls around them.

The write cost, on the hot path: a job's status change is never a HOT update, so every index on
``jobs`` takes an entry at each of a job's ~7 transitions. The partial predicate keeps
``ix_jobs_tier_created_at`` out of the enqueue (a new job has no tier) and of the transitions
before triage picks a tier; after that it costs about 3 us per transition (a 9,000-row status
UPDATE: 12.5 -> 15.6 us a row). Neither indexed column changes on a transition (created_at
never, tier only on escalation). The two child-table indexes take an entry only for the rows
they cover (one work call per attempt, escalations are rare), and index no column that is
updated later, so a call's "started -> ok" update stays eligible for HOT.

On Postgres the indexes are built CONCURRENTLY: a plain CREATE INDEX would stop every worker's
writes to these three tables for the length of the build. A concurrent build that fails leaves
an invalid index behind; running the migration again drops it first and rebuilds.

Revision ID: 49543a35e31f
Revises: 018de8abdb5a
Create Date: 2026-12-02 16:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '49543a35e31f'
down_revision: str | None = '018de8abdb5a'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# name, table, columns, predicate
INDEXES = [
    ("ix_jobs_tier_created_at", "jobs", ["tier", "created_at"], "tier IS NOT NULL"),
    ("ix_routing_decisions_escalation_job_id", "routing_decisions", ["job_id"], "reason_kind = 'escalation'"),
    ("ix_model_calls_work_job_id", "model_calls", ["job_id"], "stage = 'work'"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for name, table, columns, where in INDEXES:
            op.create_index(name, table, columns, sqlite_where=sa.text(where))
        return
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    with op.get_context().autocommit_block():
        for name, table, columns, where in INDEXES:
            op.drop_index(name, table_name=table, if_exists=True, postgresql_concurrently=True)
            op.create_index(name, table, columns, postgresql_where=sa.text(where), postgresql_concurrently=True)


def downgrade() -> None:
    for name, table, _columns, _where in reversed(INDEXES):
        op.drop_index(name, table_name=table)
