"""economy holds: a budget reservation can be held by an economy request instead of a call row

A call of an economy job is paid when its message batch runs, long after the stage that wrote its
request handed the job back (and dropped its call row). Its worst-case reservation therefore moves
from the call row to the request (``economy_request_id``, ``call_id`` NULL) while the request waits
in a batch, and the stage that applies the answer takes it back (pipeline.flow.budgets). Without
this, requests in flight held nothing, and a batch's budget could be overrun by a whole message
batch.

Both changes are cheap: dropping NOT NULL is a catalogue change, the new column is nullable with no
default, and its index is over open, request-held reservations only (none when this runs).

Revision ID: a3f7c2d9e815
Revises: b9d2e6f1a4c7
Create Date: 2026-12-07 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'a3f7c2d9e815'
down_revision: str | None = 'b9d2e6f1a4c7'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
HELD = "released_at IS NULL AND economy_request_id IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table('budget_reservations') as batch:  # SQLite changes a column only by copying the table
        batch.alter_column('call_id', existing_type=BigId, nullable=True)
        batch.add_column(sa.Column('economy_request_id', BigId, nullable=True))
        batch.create_foreign_key(op.f('fk_budget_reservations_economy_request_id_economy_requests'),
                                 'economy_requests', ['economy_request_id'], ['id'], ondelete='SET NULL')
    op.create_index('ix_budget_reservations_open_request', 'budget_reservations', ['economy_request_id'],
                    unique=False, postgresql_where=sa.text(HELD), sqlite_where=sa.text(HELD))


def downgrade() -> None:
    # A hold without a call row cannot be stored once call_id is NOT NULL again: released (its
    # request's answer, applied later, then adds its cost to the budgets without a hold).
    op.execute("DELETE FROM budget_reservations WHERE call_id IS NULL")
    op.drop_index('ix_budget_reservations_open_request', table_name='budget_reservations')
    with op.batch_alter_table('budget_reservations') as batch:
        batch.drop_constraint(op.f('fk_budget_reservations_economy_request_id_economy_requests'), type_='foreignkey')
        batch.drop_column('economy_request_id')
        batch.alter_column('call_id', existing_type=BigId, nullable=False)
