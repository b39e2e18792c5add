"""tasks: named, versioned definitions that a batch of jobs shares; jobs.task_id

A task holds what every job of a batch would otherwise repeat: its instructions, label definitions,
examples and schema. Each version is a row of its own and is never changed, so a job bound to a
version can always be shown and repeated as it ran. Names are per tenant; the operator's tasks
(from the CLI) have a NULL tenant, kept unique among themselves by a partial index, as for batches.

``jobs.task_id`` binds a job to the task version it named at enqueue. It is nullable with no
default, so adding it rewrites nothing and every existing job reads as one without a task.

Revision ID: 5c0e7a1d2b94
Revises: b23c42dca0a1
Create Date: 2026-12-07 01:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '5c0e7a1d2b94'
down_revision: str | None = 'b23c42dca0a1'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
Json = sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')
FK = 'fk_jobs_task_id_tasks'


def upgrade() -> None:
    op.create_table(
        'tasks',
        sa.Column('id', BigId, nullable=False),
        sa.Column('tenant_id', BigId, nullable=True),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('kind', sa.Enum('classify', 'extract', 'draft', 'generate', name='kind', native_enum=False,
                                  create_constraint=True, length=20), nullable=False),
        sa.Column('content_sha256', sa.String(length=64), nullable=False),
        sa.Column('definition', Json, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tasks_tenant_id_tenants'),
                                ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
        sa.UniqueConstraint('tenant_id', 'name', 'version', name=op.f('uq_tasks_tenant_id_name_version')),
    )
    op.create_index('uq_tasks_name_version_no_tenant', 'tasks', ['name', 'version'], unique=True,
                    postgresql_where=sa.text('tenant_id IS NULL'), sqlite_where=sa.text('tenant_id IS NULL'))
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table('jobs') as batch:  # SQLite adds a foreign key only by copying the table
            batch.add_column(sa.Column('task_id', BigId, nullable=True))
            batch.create_foreign_key(FK, 'tasks', ['task_id'], ['id'], ondelete='RESTRICT')
        return
    op.add_column('jobs', sa.Column('task_id', BigId, nullable=True))
    # NOT VALID, committed, then VALIDATE on its own: checking the existing rows (all NULL) then
    # takes a lock that lets the workers go on writing to jobs, instead of blocking them for a scan
    # of the whole table.
    op.execute(f"ALTER TABLE jobs ADD CONSTRAINT {FK} FOREIGN KEY (task_id) REFERENCES tasks (id) "
               f"ON DELETE RESTRICT NOT VALID")
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE jobs VALIDATE CONSTRAINT {FK}")


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(FK, type_='foreignkey')
        batch.drop_column('task_id')
    op.drop_index('uq_tasks_name_version_no_tenant', table_name='tasks')
    op.drop_table('tasks')
