"""Feeding the stages from Postgres, and recovering what the broker lost.

Postgres is the queue of record. ``dispatch`` moves queued jobs into their first stage (which ones,
by priority and round robin across tenants: pipeline.flow.admission) only while fewer than
``max_in_flight`` jobs are active, so Redis holds at most that many messages however large the
batch. ``refeed`` publishes again the stages that waited out transient errors (their wait is a time
in Postgres, not a message, so a broker flush cannot lose or shorten it). ``sweep`` republishes the
stages of a killed worker, as soon as its heartbeat has lapsed, and any stage that has made no
progress past its deadline: a message lost in a Redis flush, or a dead worker whose heartbeat cannot
be read. Duplicates this may create are harmless, because stages move jobs by conditional update.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Protocol

from sqlalchemy import ColumnElement, and_, func, insert, or_, select, update

from pipeline.db import Executor
from pipeline.flow import admission, budgets, shadow
from pipeline.flow.stages import Handoff, Pipeline, handoff_for
from pipeline.flow.states import transition_many
from pipeline.models import ACTIVE, Job, JobStatus, ModelCall, RoutingDecision, utcnow
from pipeline.queries import rollups

log = logging.getLogger(__name__)

Publish = Callable[[Iterable[Handoff]], None]
# Which of the given workers (as claims name them) have stopped beating: pipeline.queries.ops.LapsedWorkers.
Lapsed = Callable[[Sequence[str]], set[str]]


def active_count(session: Executor) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE))) or 0


def dispatch(session: Executor, *, max_in_flight: int, limit: int = 1000) -> list[Handoff]:
    """Move up to ``limit`` queued jobs into their first stage, within ``max_in_flight`` (counted,
    for each priority, over the jobs in flight at that priority or above)."""
    # By priority, then round robin across tenants and batches (pipeline.flow.admission); two
    # dispatchers (an operator may run more than one) take disjoint sets of jobs.
    rows = admission.admit(session, max_in_flight=max_in_flight, limit=limit)
    if not rows:
        return []
    # Each job's messages carry its batch's priority, the stages after this one included (workers.base).
    pri = {r.id: admission.message_priority(r.priority) for r in rows}
    to_triage = [r.id for r in rows if r.pinned_tier is None]
    pinned: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if r.pinned_tier is not None:
            pinned[r.pinned_tier].append(r.id)

    handoffs = [Handoff("triage", m.id, "triage", priority=pri[m.id]) for m in
                transition_many(session, to_triage, frm=JobStatus.QUEUED, to=JobStatus.TRIAGING,
                                detail="dispatched to triage")]
    for tier, ids in pinned.items():
        moved = transition_many(session, ids, frm=JobStatus.QUEUED, to=JobStatus.WORKING, tier=tier,
                                attempt=1, detail=f"pinned to {tier}")
        if moved:
            session.execute(insert(RoutingDecision), [
                {"job_id": m.id, "reason_kind": "pinned", "to_tier": tier, "reason": "tier pinned by the job",
                 "created_at": utcnow()} for m in moved
            ])
        handoffs += [Handoff("work", m.id, tier, priority=pri[m.id]) for m in moved]
    return handoffs


def refeed(session: Executor, *, now: datetime | None = None, limit: int = 1000) -> list[Handoff]:
    """Publish again the stages whose wait after transient errors is over (``not_before`` reached;
    pipeline.flow.stages._after_transient): they go to the back of their queue. The wait ends here, in
    the same statement, so a job is fed once however many dispatchers run; if the publish that
    follows is lost, the job is an unclaimed stage like any other, and the sweeper finds it."""
    now = now or utcnow()
    due = (select(Job.id).where(Job.not_before <= now, Job.status.in_(ACTIVE), Job.claimed_at.is_(None))
           .order_by(Job.not_before).limit(limit).with_for_update(skip_locked=True))
    rows = session.execute(
        update(Job).where(Job.id.in_(due.scalar_subquery())).values(not_before=None, stage_started_at=utcnow())
        .returning(Job.id, Job.status, Job.tier).execution_options(synchronize_session=False)
    ).all()
    return [h for r in rows if (h := handoff_for(r.id, JobStatus(r.status), r.tier)) is not None]


# A job whose stage has died under it this many times is a suspect: it may be what kills workers.
SUSPECT_DELIVERIES = 2


def _queue(status: JobStatus, tier: str | None) -> str:
    h = handoff_for(0, status, tier)
    return h.queue if h else ""


def _held_by(dead_workers: Collection[str]) -> ColumnElement[bool] | None:
    return Job.claimed_by.in_(list(dead_workers)) if dead_workers else None


def _on_probation(session: Executor, claim_cutoff: datetime, lost_cutoff: datetime,
                  dead_workers: Collection[str] = ()) -> set[str]:
    """Queues where a suspect is on probation right now: running (a live claim), or republished
    and on its way to a worker. Counting only running ones would let the next sweep send a second
    suspect while the first still waits in the queue, and the two could die together again.

    On its way means until its message counts as lost (the stage deadline, ``lost_cutoff``), not
    the much shorter claim deadline: the worker the poison job killed takes seconds to come back,
    and a second suspect sent meanwhile would reach it in the same breath as the first. One held by
    a dead worker is not running at all."""
    live = Job.claimed_at >= claim_cutoff
    if (dead := _held_by(dead_workers)) is not None:
        live = and_(live, or_(Job.claimed_by.is_(None), ~dead))
    rows = session.execute(
        select(Job.status, Job.tier).distinct()
        .where(Job.status.in_(ACTIVE), Job.deliveries >= SUSPECT_DELIVERIES,
               or_(live, and_(Job.claimed_at.is_(None), Job.stage_started_at >= lost_cutoff)))
    ).all()
    return {_queue(r.status, r.tier) for r in rows}


def claim_holders(session: Executor) -> list[str]:
    """The workers holding a stage right now, as their claims name them."""
    return list(session.scalars(select(Job.claimed_by).distinct()
                                .where(Job.status.in_(ACTIVE), Job.claimed_by.is_not(None))))


def sweep(session: Executor, *, deadline_s: float, claim_deadline_s: float, lost_before: datetime | None = None,
          dead_workers: Collection[str] = (), limit: int = 1000) -> list[Handoff]:
    """Republish stages whose worker died, and stages whose message was lost (see the module doc).

    A claim is dead when its worker is among ``dead_workers`` (its heartbeat has lapsed), at once,
    or when it has shown no sign of life for ``claim_deadline_s``. The deadline stays in force for
    every claim: it is the fallback when a worker's heartbeat cannot be read (Redis down, a worker
    without one), and it also frees a stage whose thread stalled in a worker that still beats.

    Suspects go on probation. A poison job kills every job in flight beside it on its worker, and
    they are all swept and republished together, so without care the innocent ones would die with
    it again and again and be failed as poison too. So a job that has already died
    ``SUSPECT_DELIVERIES`` times is republished only while no other suspect of its queue is running,
    one at a time: the poison job then dies alone, and an innocent suspect finishes. A first death
    (the usual case: one worker killed) is republished at once, keeping recovery fast."""
    now = utcnow()
    claim_cutoff = now - timedelta(seconds=claim_deadline_s)
    lost_cutoff = now - timedelta(seconds=deadline_s)
    if lost_before is not None:
        lost_cutoff = max(lost_cutoff, lost_before)
    # A stage waiting out transient errors (not_before set) has no message to lose: refeed sends it.
    lost = and_(Job.claimed_at.is_(None), Job.not_before.is_(None), Job.stage_started_at < lost_cutoff)
    stalled = [Job.claimed_at < claim_cutoff, lost]
    if (orphaned := _held_by(dead_workers)) is not None:
        # Re-checked on the locked row: a claim another worker has taken since is not selected.
        stalled.append(orphaned)
    rows = session.execute(
        select(Job.id, Job.status, Job.tier, Job.claimed_at, Job.claimed_by, Job.deliveries)
        .where(Job.status.in_(ACTIVE), or_(*stalled))
        .order_by(Job.stage_started_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    dead = [r.id for r in rows if r.claimed_at is not None]
    if dead:
        # A call still "started" under a dead claim will never report back: its worker is gone. (A
        # lapsed worker's claim may be seconds old, and every call under it is dead with it.)
        of_dead_worker = [r.id for r in rows if r.claimed_by is not None and r.claimed_by in dead_workers]
        session.execute(
            update(ModelCall)
            .where(ModelCall.job_id.in_(dead), ModelCall.outcome == "started",
                   or_(ModelCall.started_at < claim_cutoff, ModelCall.job_id.in_(of_dead_worker)))
            .values(outcome="abandoned", finished_at=now)
            .execution_options(synchronize_session=False)
        )
    busy = _on_probation(session, claim_cutoff, lost_cutoff, dead_workers)
    chosen, held = [], 0
    for r in rows:
        if r.claimed_at is not None and r.deliveries >= SUSPECT_DELIVERIES:
            queue = _queue(r.status, r.tier)
            if queue in busy:
                held += 1  # left as it is (a stale claim): a later sweep takes it up
                continue
            busy.add(queue)
        chosen.append(r)
    if not chosen:
        return []
    ids = [r.id for r in chosen]
    # Restart the clock so the next sweep gives the republished message a full deadline, and drop
    # the dead worker's claim so that message may take the stage.
    session.execute(update(Job).where(Job.id.in_(ids)).values(stage_started_at=now, claimed_at=None, claimed_by=None)
                    .execution_options(synchronize_session=False))
    n_lapsed = sum(1 for r in chosen if r.claimed_by is not None and r.claimed_by in dead_workers)
    n_stale = sum(1 for r in chosen if r.claimed_at is not None) - n_lapsed
    log.warning("sweeper: republishing %d job(s): %d whose worker's heartbeat lapsed, %d whose worker showed no "
                "sign of life for over %.0f s, %d whose message was lost%s; %d suspect(s) held on probation",
                len(ids), n_lapsed, n_stale, claim_deadline_s, len(ids) - n_lapsed - n_stale,
                " (the broker lost its data)" if lost_before else f" (unclaimed for over {deadline_s:.0f} s)", held)
    return [h for r in chosen if (h := handoff_for(r.id, r.status, r.tier)) is not None]


def sweep_stalled(p: Pipeline, *, deadline_s: float, claim_deadline_s: float, lapsed: Lapsed | None = None,
                  lost_before: datetime | None = None) -> list[Handoff]:
    """One sweep as the dispatcher runs it: first ask the heartbeats which workers holding claims
    have died (``lapsed``; outside any transaction, as Redis may be slow or down), then sweep."""
    dead: set[str] = set()
    if lapsed is not None and (holders := p.run(claim_holders, autocommit=True)):
        dead = lapsed(holders)
    return p.run(lambda s: admission.with_priorities(s, sweep(
        s, deadline_s=deadline_s, claim_deadline_s=claim_deadline_s, lost_before=lost_before, dead_workers=dead)))


class RollupFolder:
    """The dispatcher's turn at the rollups: every ``interval_s``, fold what ended since
    (pipeline.queries.rollups.fold), at once again while a fold comes back full."""

    def __init__(self, p: Pipeline, interval_s: float) -> None:
        self.p, self.interval_s, self.due = p, interval_s, 0.0

    def __call__(self) -> None:
        if time.monotonic() < self.due:
            return
        try:
            done = self.p.run(rollups.fold)
        except Exception:
            log.exception("rollups: the fold failed; trying again in %.0f s", self.interval_s)
            done = None
        self.due = time.monotonic() + (0 if done is not None and done.full else self.interval_s)


def settle_budgets(session: Executor) -> list[Handoff]:
    budgets.release_abandoned(session)
    return [h for r in budgets.resume_due(session) if (h := handoff_for(r.id, r.status, r.tier)) is not None]


class Stopper(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def run_dispatcher(
    p: Pipeline,
    publish: Publish,
    *,
    max_in_flight: int,
    interval_s: float,
    deadline_s: float,
    claim_deadline_s: float,
    broker_lost: Callable[[], bool] | None = None,
    lapsed: Lapsed | None = None,
    stop: Stopper | None = None,
    on_tick: Callable[[int, int], None] | None = None,
    rollup_interval_s: float = 5.0,
    economy: Callable[[], None] | None = None,
) -> None:
    """Dispatch and sweep until ``stop`` is set. Publishing happens after each commit.

    ``broker_lost()`` says whether the broker lost its messages since it was last asked;
    ``lapsed(workers)`` which of the workers holding claims have stopped beating; ``economy()``
    runs economy mode's round (pipeline.flow.economy.Economy.tick: submit, poll, wake), before the
    refeed that publishes the jobs it woke."""
    stop = stop or threading.Event()
    fold = RollupFolder(p, rollup_interval_s)
    while not stop.is_set():
        fold()
        if economy is not None:
            economy()
        dispatched = p.run(lambda s: dispatch(s, max_in_flight=max_in_flight))
        publish(dispatched)
        publish(p.run(lambda s: admission.with_priorities(s, refeed(s))))
        # Asked after dispatching: what was just published may have gone with the broker's data
        # too, and is unclaimed, so the sweep below covers it.
        lost_before = utcnow() if broker_lost is not None and broker_lost() else None
        # Past the limit of one sweep, a broker loss must still reach every job: sweep again until
        # a sweep comes back short (each republished job's clock restarts after ``lost_before``).
        while True:
            swept = sweep_stalled(p, deadline_s=deadline_s, claim_deadline_s=claim_deadline_s, lapsed=lapsed,
                                  lost_before=lost_before)
            publish(swept)
            if lost_before is None or len(swept) < 1000:
                break
        # Budgets (pipeline.flow.budgets): free what the calls that died with their worker reserved
        # (the sweep above marked them abandoned), then resume the paused jobs that fit again.
        publish(p.run(settle_budgets))
        # Shadow evaluation's steps: those due after transient errors, lost, or held by a dead worker.
        publish(p.run(partial(shadow.sweep, deadline_s=deadline_s, claim_deadline_s=claim_deadline_s,
                              lost_before=lost_before)))
        if on_tick:
            on_tick(len(dispatched), len(swept))
        # A full dispatch means more is waiting and there was room: go again at once.
        if len(dispatched) < 1000:
            stop.wait(interval_s)
