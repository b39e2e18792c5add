"""jobs batch/status index covers the stats: ix_jobs_batch_id_status_id INCLUDE (tier, escalations)

``report.summarize`` starts with one pass over the summarized jobs (per status and tier: how many,
their escalations, their id range). For a batch it read ``ix_jobs_batch_id_id`` and then every
job's heap row: on 1,000,000 jobs (``python -m bench history``), a 10,000-job batch took 356
buffers, about 325 of them heap pages of these wide rows (payload, output). With tier and
escalations carried in ``ix_jobs_batch_id_status_id`` the pass is an index-only scan: 88 buffers,
no heap fetches, about half the statement's time, and summarize's p50 in the bench's loop went
from 49.7 to 44.3 ms (a busy shared machine).

The index is replaced, not added: a job's status change is never a HOT update, so every index
on ``jobs`` already takes an entry at each transition, and the two included columns only widen
those entries (by a few bytes: a new job has no tier yet). ``list_jobs(batch=..., status=...)``
and ``cancel_batch`` read the same keys as before. The scan is index-only where the visibility
map says so (after a vacuum of a finished batch's pages); elsewhere it reads the heap as before.

On Postgres the new index is built CONCURRENTLY under a temporary name, then the old one is
dropped (also concurrently) and the new one takes its name; running the migration again after a
failure starts over from whatever it left. SQLite (the demo) has no INCLUDE: its index stays as
it is, which is also what the models give it there.

Revision ID: 0299eae21a22
Revises: 49543a35e31f
Create Date: 2026-12-03 14:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0299eae21a22'
down_revision: str | None = '49543a35e31f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_jobs_batch_id_status_id"
COLUMNS = ["batch_id", "status", "id"]


def _replace(include: list[str]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    building = f"{NAME}_new"
    # CREATE/DROP INDEX CONCURRENTLY cannot run inside a transaction.
    with op.get_context().autocommit_block():
        op.drop_index(building, table_name="jobs", if_exists=True, postgresql_concurrently=True)
        op.create_index(building, "jobs", COLUMNS, postgresql_include=include, postgresql_concurrently=True)
        op.drop_index(NAME, table_name="jobs", if_exists=True, postgresql_concurrently=True)
        op.execute(f"ALTER INDEX {building} RENAME TO {NAME}")


def upgrade() -> None:
    _replace(["tier", "escalations"])


def downgrade() -> None:
    _replace([])
