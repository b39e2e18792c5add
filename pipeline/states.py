"""The job state machine, in one place.

    queued ──► triaging ──► working ──► validating ──► succeeded
       │           │           ▲  │          │
       │           │           └──┼──────────┤ (retry / escalation)
       └───────────┴───────────── ┴──────────┴──► failed | cancelled

Every transition is one conditional UPDATE from the status *and version* the caller read, so a
message delivered twice, or a sweeper racing a slow worker, moves a job at most once. Each
successful transition also writes a ``job_events`` row with its timestamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from pipeline.models import TERMINAL, Job, JobEvent, JobStatus, utcnow

Q, T, W, V = JobStatus.QUEUED, JobStatus.TRIAGING, JobStatus.WORKING, JobStatus.VALIDATING
S, F, C = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    Q: frozenset({T, W, F, C}),
    T: frozenset({W, F, C}),
    W: frozenset({V, F, C}),
    V: frozenset({S, W, F, C}),
    S: frozenset(),
    F: frozenset(),
    C: frozenset(),
}


class IllegalTransition(ValueError):
    pass


def check(frm: JobStatus, to: JobStatus) -> None:
    if to not in ALLOWED[frm]:
        raise IllegalTransition(f"a job cannot go from {frm.value} to {to.value}")


def _entry_values(to: JobStatus, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {"status": to, "version": Job.version + 1, "updated_at": now,
                              "deliveries": 0}
    if to in TERMINAL:
        values.update(finished_at=now, stage_started_at=None, candidate=None)
    else:
        values["stage_started_at"] = now
    return values


def transition(
    session: Session,
    job_id: int,
    *,
    frm: JobStatus,
    version: int,
    to: JobStatus,
    detail: str | None = None,
    **values: Any,
) -> bool:
    """Move one job if it is still at ``frm``/``version``. True if this call moved it."""
    check(frm, to)
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == frm, Job.version == version)
        .values(**_entry_values(to, now), **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(JobEvent(job_id=job_id, from_status=frm, to_status=to, at=now, detail=detail))
    return True


@dataclass(frozen=True)
class Moved:
    id: int
    tier: str | None


def transition_many(
    session: Session,
    job_ids: Sequence[int],
    *,
    frm: JobStatus,
    to: JobStatus,
    detail: str | None = None,
    **values: Any,
) -> list[Moved]:
    """Move every job of ``job_ids`` that is still at ``frm`` (whatever its version): for bulk
    moves out of ``queued``, where no stage has read the job yet."""
    check(frm, to)
    if not job_ids:
        return []
    now = utcnow()
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == frm)
        .values(**_entry_values(to, now), **values)
        .returning(Job.id, Job.tier)
        .execution_options(synchronize_session=False)
    ).all()
    moved = [Moved(r.id, r.tier) for r in rows]
    if moved:
        session.execute(insert(JobEvent), [
            {"job_id": m.id, "from_status": frm, "to_status": to, "at": now, "detail": detail}
            for m in moved
        ])
    return moved


@dataclass(frozen=True)
class Claim:
    """A snapshot of a job taken when a stage begins it."""

    id: int
    version: int
    deliveries: int
    kind: Any
    payload: dict[str, Any]
    tier: str | None
    attempt: int
    feedback: str | None
    candidate: str | None
    candidate_stop: str | None


def begin_stage(session: Session, job_id: int, *, status: JobStatus) -> Claim | None:
    """Record that a stage is starting on a job, if the job is in that stage at all.

    Returns None for a stale or duplicate message (the job has moved on). The delivery count it
    raises is what catches a poison job that kills its worker on every try."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status)
        .values(deliveries=Job.deliveries + 1, stage_started_at=utcnow())
        .returning(Job.id, Job.version, Job.deliveries, Job.kind, Job.payload, Job.tier, Job.attempt,
                   Job.feedback, Job.candidate, Job.candidate_stop)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    return Claim(*row)


def release_stage(session: Session, job_id: int, *, status: JobStatus, version: int) -> bool:
    """Undo ``begin_stage`` for a stage that handed its job back unstarted (a rate-limit wait):
    the delivery did not run, so it must not count towards the poison-job bound, and the sweeper's
    clock restarts. True if the job was still where the stage left it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status, Job.version == version, Job.deliveries > 0)
        .values(deliveries=Job.deliveries - 1, stage_started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def status_of(session: Session, job_id: int) -> JobStatus | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))
