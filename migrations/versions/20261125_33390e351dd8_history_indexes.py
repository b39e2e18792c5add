"""history indexes: the job-history queries (jobs list, batches, cancel, export) at millions of jobs

pipeline/queries/history.py's docstring says which query reads each index and why. The idempotency
constraint on (batch_id, key) becomes a unique index with varchar_pattern_ops on key, so that the
same index also serves key-prefix searches.

Revision ID: 33390e351dd8
Revises: 25f6f19bf3a3
Create Date: 2026-11-25 20:33:37.319828
"""

from collections.abc import Sequence

from alembic import op

revision: str = '33390e351dd8'
down_revision: str | None = '25f6f19bf3a3'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PATTERN_OPS = {"key": "varchar_pattern_ops"}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # Build the new unique index before dropping the constraint, so no moment of this
        # transaction lacks the idempotency guarantee, then give it the constraint's name.
        op.create_index("uq_jobs_batch_id_key_new", "jobs", ["batch_id", "key"], unique=True,
                        postgresql_ops=PATTERN_OPS)
        op.drop_constraint("uq_jobs_batch_id_key", "jobs", type_="unique")
        op.execute("ALTER INDEX uq_jobs_batch_id_key_new RENAME TO uq_jobs_batch_id_key")
    else:
        # SQLite (the demo) drops a constraint only by copying the table.
        with op.batch_alter_table("jobs") as batch:
            batch.drop_constraint("uq_jobs_batch_id_key", type_="unique")
        op.create_index("uq_jobs_batch_id_key", "jobs", ["batch_id", "key"], unique=True)
    op.create_index("ix_jobs_batch_id_id", "jobs", ["batch_id", "id"])
    op.create_index("ix_jobs_batch_id_status_id", "jobs", ["batch_id", "status", "id"])
    op.create_index("ix_jobs_status_id", "jobs", ["status", "id"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index("ix_jobs_created_at", table_name="jobs", postgresql_using="brin")
    op.drop_index("ix_jobs_status_id", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_status_id", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_id", table_name="jobs")
    op.drop_index("uq_jobs_batch_id_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.create_unique_constraint("uq_jobs_batch_id_key", ["batch_id", "key"])
