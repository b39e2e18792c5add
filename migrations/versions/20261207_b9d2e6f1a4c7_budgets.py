"""budgets: batches.budget_usd and budget_spent_usd, tenant_spend_days, budget_reservations, paused jobs

A batch may have a spending cap, and a tenant's daily limit is now enforced at call time too: each
call reserves its worst-case cost against the budgets that cover it before it is made
(pipeline.flow.budgets). ``budget_reservations`` holds one row per such call, open until the call's
result replaces it with the actual cost; ``tenant_spend_days`` is the row a tenant's reservations
lock and its costs are added to, one per UTC day. A call that does not fit pauses its job: the
status column's CHECK (on jobs and job_events) now allows ``paused``, and three nullable job
columns say why, where it resumes to and how much it needs.

Every new column is nullable or has a constant default, so adding it rewrites no table.

Revision ID: b9d2e6f1a4c7
Revises: e5c0a3b9d417
Create Date: 2026-12-07 06:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b9d2e6f1a4c7'
down_revision: str | None = 'e5c0a3b9d417'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
Money = sa.Numeric(14, 8)
OLD_STATUSES = ('queued', 'triaging', 'working', 'validating', 'succeeded', 'failed', 'cancelled')
NEW_STATUSES = (*OLD_STATUSES, 'paused')
# (table, column, the CHECK's name as the naming convention made it)
CHECKS = (('jobs', 'status', 'ck_jobs_status'), ('job_events', 'from_status', 'ck_job_events_from_status'),
          ('job_events', 'to_status', 'ck_job_events_to_status'))
OPEN = "released_at IS NULL"


def _check(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _set_statuses(values: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        for table, column, name in CHECKS:
            with op.batch_alter_table(table) as batch:  # SQLite changes a CHECK only by copying the table
                batch.drop_constraint(op.f(name), type_='check')
                batch.create_check_constraint(column, sa.text(_check(column, values)))
        return
    for table, column, name in CHECKS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        # NOT VALID, then VALIDATE on its own: checking the existing rows then does not block the
        # workers' writes for a scan of the whole table.
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({_check(column, values)}) NOT VALID")
    with op.get_context().autocommit_block():
        for table, _column, name in CHECKS:
            op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")


def upgrade() -> None:
    op.add_column('batches', sa.Column('budget_usd', Money, nullable=True))
    op.add_column('batches', sa.Column('budget_spent_usd', Money, server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('paused_reason', sa.String(length=20), nullable=True))
    op.add_column('jobs', sa.Column('paused_from', sa.String(length=20), nullable=True))
    op.add_column('jobs', sa.Column('paused_need_usd', Money, nullable=True))
    op.create_table(
        'tenant_spend_days',
        sa.Column('id', BigId, nullable=False),
        sa.Column('tenant_id', BigId, nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('spent_usd', Money, server_default='0', nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tenant_spend_days_tenant_id_tenants'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tenant_spend_days')),
        sa.UniqueConstraint('tenant_id', 'day', name=op.f('uq_tenant_spend_days_tenant_id_day')),
    )
    op.create_table(
        'budget_reservations',
        sa.Column('id', BigId, nullable=False),
        sa.Column('call_id', BigId, nullable=False),
        sa.Column('job_id', BigId, nullable=False),
        sa.Column('batch_id', BigId, nullable=True),
        sa.Column('day_id', BigId, nullable=True),
        sa.Column('amount_usd', Money, nullable=False),
        sa.Column('cost_usd', Money, nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('released_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['call_id'], ['model_calls.id'], name=op.f('fk_budget_reservations_call_id_model_calls'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_budget_reservations_job_id_jobs'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_budget_reservations_batch_id_batches'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['day_id'], ['tenant_spend_days.id'],
                                name=op.f('fk_budget_reservations_day_id_tenant_spend_days'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_budget_reservations')),
        sa.UniqueConstraint('call_id', name=op.f('uq_budget_reservations_call_id')),
    )
    op.create_index(op.f('ix_budget_reservations_job_id'), 'budget_reservations', ['job_id'], unique=False)
    op.create_index('ix_budget_reservations_open_batch', 'budget_reservations', ['batch_id'], unique=False,
                    postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))
    op.create_index('ix_budget_reservations_open_day', 'budget_reservations', ['day_id'], unique=False,
                    postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))
    _set_statuses(NEW_STATUSES)


def downgrade() -> None:
    # A paused job cannot be stored once the CHECK no longer allows it: it goes back to its stage
    # (where it was when it paused), unclaimed, and the sweeper republishes it.
    op.execute("UPDATE jobs SET status = paused_from WHERE status = 'paused'")
    op.execute("DELETE FROM job_events WHERE from_status = 'paused' OR to_status = 'paused'")
    _set_statuses(OLD_STATUSES)
    op.drop_index('ix_budget_reservations_open_day', table_name='budget_reservations')
    op.drop_index('ix_budget_reservations_open_batch', table_name='budget_reservations')
    op.drop_index(op.f('ix_budget_reservations_job_id'), table_name='budget_reservations')
    op.drop_table('budget_reservations')
    op.drop_table('tenant_spend_days')
    op.drop_column('jobs', 'paused_need_usd')
    op.drop_column('jobs', 'paused_from')
    op.drop_column('jobs', 'paused_reason')
    op.drop_column('batches', 'budget_spent_usd')
    op.drop_column('batches', 'budget_usd')
