"""Counters of what faults cost: calls made again because a stage was begun again (a worker died,
a message was redelivered), and calls abandoned by a dead worker. `switchyard stats` reports them
next to the routing math; the fault tests check them against the fake Claude's own log."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from pipeline.models import Job, ModelCall


@dataclass(frozen=True)
class CallCounts:
    total: int
    # Made by a later delivery of the same stage (delivery > 1): the earlier delivery's worker died
    # or stalled, so this call repeated one that was already made (and perhaps paid for).
    repeated: int
    # Began, and their worker died before recording an outcome; the sweeper closed them.
    abandoned: int
    # Made by a delivery that lost the race to move the job: paid for, not used.
    unapplied_ok: int


def call_counts(session: Session, *, batch_id: int | None = None) -> CallCounts:
    one = 1
    query = select(
        func.count(),
        func.coalesce(func.sum(case((ModelCall.delivery > one, one), else_=0)), 0),
        func.coalesce(func.sum(case((ModelCall.outcome == "abandoned", one), else_=0)), 0),
        func.coalesce(func.sum(case(((ModelCall.outcome == "ok") & ModelCall.applied.is_(False), one), else_=0)), 0),
    ).select_from(ModelCall)
    if batch_id is not None:
        query = query.join(Job, Job.id == ModelCall.job_id).where(Job.batch_id == batch_id)
    total, repeated, abandoned, unapplied = session.execute(query).one()
    return CallCounts(int(total), int(repeated), int(abandoned), int(unapplied))
