"""Queue status for the API: messages waiting in each broker queue (LLEN of the queue's Redis
list: switchyard publishes without priorities, so the base list holds them all) and unfinished
jobs by status from Postgres.

A stopgap until the operator status (`switchyard status`, pipeline/ops.py) is on main; the API
should then read that instead of this."""

from __future__ import annotations

from collections.abc import Iterable

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.errors import SwitchyardError
from pipeline.models import TERMINAL, Job, JobStatus


class BrokerDown(SwitchyardError):
    pass


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for q in names:
        pipe.llen(q)
    try:
        counts = pipe.execute()
    except redis.RedisError as exc:
        raise BrokerDown(f"the broker is unreachable ({type(exc).__name__})") from None
    return dict(zip(names, (int(n) for n in counts), strict=True))


def unfinished_jobs(session: Session) -> dict[str, int]:
    """Jobs queued or in a stage, by status, across every tenant."""
    rows = session.execute(select(Job.status, func.count()).where(Job.status.not_in(list(TERMINAL)))
                           .group_by(Job.status))
    counts = {s.value: 0 for s in JobStatus if s not in TERMINAL}
    for status, n in rows:
        counts[JobStatus(status).value] = int(n)
    return counts
