"""Shadow evaluation: a sampled job, once it has succeeded below the reference tier, is worked again
by the reference tier, and the two answers are compared (pipeline.quality.agreement).

It runs off the job's path. The job is answered first: the sample is drawn, and its row written,
in the same statement that moves the job to ``succeeded`` (stages._apply_verdict); the shadow
step is then published to the reference tier's queue at the lowest priority, so the tier's
workers take it only when no job's stage is waiting there. Its calls are ``model_calls`` rows of
the stages ``shadow`` and ``judge``: evaluation cost, summed on the shadow's row, never added to the
job's cost.

    pending ──► working ──► done | failed          (classify, extract: compared by rule)
                   └──────► judging ──► done | failed   (draft, generate: a judge call)

Each move is one conditional UPDATE from the status and version the step read, as for jobs
(pipeline.flow.states), so a duplicate message moves a shadow at most once. A step handed back
(its tier's rate limit, transient errors) keeps its status, and the dispatcher's sweep publishes
it again when it is due, or when its message or its worker was lost (``sweep``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, and_, case, insert, literal, or_, select, update
from sqlalchemy.exc import OperationalError

from pipeline.claude.client import CallResult
from pipeline.db import Executor
from pipeline.errors import CallFailed, Deferred, Parked
from pipeline.flow import budgets, economy
from pipeline.flow.prompts import judge_prompt, work_prompt
from pipeline.flow.stages import (
    SHADOW_PRIORITY,
    Handoff,
    Pipeline,
    _call_writes,
    _shared,
    _total_cost,
    call_model,
    replaying,
)
from pipeline.flow.states import Also, Claim
from pipeline.flow.validation import check_stop, deterministic_check
from pipeline.models import (
    EVALUATION_STAGES,
    OPEN_SHADOW,
    Job,
    JobKind,
    ModelCall,
    ShadowEvaluation,
    ShadowStatus,
    Stage,
    utcnow,
)
from pipeline.quality.agreement import Agreement, as_text, parse_judge, same_fields, same_label

log = logging.getLogger(__name__)

SHADOW = "shadow"
PRIORITY = SHADOW_PRIORITY
# A shadow step whose call does not fit the tenant's daily limit asks again this often (a raised
# limit, or reservations released meanwhile).
RESERVE_RETRY_S = 600.0

_SHADOWS, _CALLS = cast(Table, ShadowEvaluation.__table__), cast(Table, ModelCall.__table__)
P, W, J = ShadowStatus.PENDING, ShadowStatus.WORKING, ShadowStatus.JUDGING
D, F = ShadowStatus.DONE, ShadowStatus.FAILED

ALLOWED: dict[ShadowStatus, frozenset[ShadowStatus]] = {
    P: frozenset({W, F}),
    W: frozenset({J, D, F, P}),  # back to pending: the step handed back before its answer
    J: frozenset({D, F}),
    D: frozenset(),
    F: frozenset(),
}


def handoff(job_id: int, queue: str, *, delay_s: float = 0.0) -> Handoff:
    return Handoff(SHADOW, job_id, queue, delay_s=delay_s, priority=PRIORITY)


@dataclass(frozen=True)
class ShadowClaim:
    id: int
    job_id: int
    version: int
    status: ShadowStatus
    deliveries: int
    reference_tier: str
    judge_tier: str | None
    reference_answer: str | None
    created_at: datetime


def begin(session: Executor, job_id: int, *, claim_deadline_s: float, now: datetime) -> ShadowClaim | None:
    """Claim the job's shadow for its next step, if it has one and no live worker holds it: a
    pending shadow becomes working; a judging one stays judging, claimed. None for a duplicate or
    stale message, and for a step waiting out transient errors (the sweep publishes it when due)."""
    s = _SHADOWS.c
    stale = now - timedelta(seconds=claim_deadline_s)
    # A claim stamped with this very time is this claim, committed once and now replayed by
    # Pipeline.run (its acknowledgement was lost with the connection): taken again, counted once.
    mine = s.claimed_at == now
    row = session.execute(
        update(_SHADOWS)
        .where(s.job_id == job_id, s.not_before.is_(None),
               or_(s.status == P, and_(s.status.in_([W, J]),
                                       or_(s.claimed_at.is_(None), s.claimed_at < stale, mine))))
        .values(status=case((s.status == P, literal(W.value)), else_=s.status), claimed_at=now,
                deliveries=case((mine, s.deliveries), else_=s.deliveries + 1),
                version=case((mine, s.version), else_=s.version + 1), updated_at=now)
        .returning(s.id, s.job_id, s.version, s.status, s.deliveries, s.reference_tier, s.judge_tier,
                   s.reference_answer, s.created_at)
    ).first()
    return ShadowClaim(*row) if row is not None else None


def move(session: Executor, c: ShadowClaim, *, to: ShadowStatus, **values: Any) -> bool:
    """Move the shadow from the status and version ``c`` read to ``to``; True if this call moved it."""
    if to not in ALLOWED[c.status]:
        raise ValueError(f"a shadow cannot go from {c.status.value} to {to.value}")
    now = utcnow()
    sets: dict[str, Any] = {"status": to, "version": _SHADOWS.c.version + 1, "updated_at": now, "claimed_at": None,
                            **values}
    if to in (D, F):
        sets["finished_at"] = now
    result = session.execute(update(_SHADOWS).where(_SHADOWS.c.id == c.id, _SHADOWS.c.status == c.status,
                                                    _SHADOWS.c.version == c.version).values(sets))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: Executor, c: ShadowClaim, *, not_before: datetime | None = None) -> bool:
    """Hand the step back without counting a delivery: a working shadow is pending again, a judging
    one stays judging; ``not_before``: it waits in Postgres until then (the sweep publishes it)."""
    sets: dict[str, Any] = {"claimed_at": None, "deliveries": _SHADOWS.c.deliveries - 1, "not_before": not_before,
                            "updated_at": utcnow(), "version": _SHADOWS.c.version + 1}
    if c.status is W:
        sets["status"] = P
    result = session.execute(update(_SHADOWS).where(_SHADOWS.c.id == c.id, _SHADOWS.c.status == c.status,
                                                    _SHADOWS.c.version == c.version).values(sets))
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Job:
    kind: JobKind
    payload: dict[str, Any]
    output: Any
    task_id: int | None
    version: int
    batch_id: int | None


def run(p: Pipeline, job_id: int) -> Handoff | None:
    """One step of a job's shadow: the reference call, or the judge call. Returns the hand-off to
    publish after the commit (the judge's step, or the same step deferred), or None."""
    now = utcnow()

    def claim(session: Connection) -> tuple[ShadowClaim, _Job | None, int | None] | None:
        c = begin(session, job_id, claim_deadline_s=p.claim_deadline_s, now=now)
        if c is None:
            return None
        if c.deliveries > 1 or replaying(session):
            # A call still "started" belongs to an earlier claim of this step, whose worker died
            # (or to this claim's first run, whose commit was acknowledged too late to be seen).
            session.execute(update(ModelCall).where(ModelCall.job_id == job_id, ModelCall.outcome == "started",
                                                    ModelCall.stage.in_(EVALUATION_STAGES))
                            .values(outcome="abandoned", finished_at=now))
        if c.deliveries > p.max_deliveries:
            return c, None, None
        row = session.execute(select(Job.kind, Job.payload, Job.output, Job.task_id, Job.version, Job.batch_id)
                              .where(Job.id == job_id)).one()
        stage, tier = _step(c)
        call_id = session.execute(insert(_CALLS).returning(_CALLS.c.id), {
            "job_id": job_id, "stage": stage, "tier": tier, "model": p.models.tier(tier).model, "attempt": 1,
            "outcome": "started", "delivery": c.deliveries, "started_at": utcnow()}).scalar_one()
        return c, _Job(JobKind(row.kind), row.payload, row.output, row.task_id, row.version, row.batch_id), call_id

    claimed = p.run(claim)
    if claimed is None:
        return None
    c, job, call_id = claimed
    if job is None or call_id is None:
        p.run(lambda s: move(s, c, to=F, error=f"poison: the {c.status.value} step was started "
                                                f"{c.deliveries - 1} times and never finished"))
        return None
    stage, tier = _step(c)
    # The job's claim-shaped snapshot, for the prompt's task part and the call's record.
    snap = Claim(id=job_id, version=0, deliveries=c.deliveries, kind=job.kind, payload=job.payload, tier=tier,
                 attempt=1, feedback=None, candidate=None, candidate_stop=None, task_id=job.task_id)
    shared = _shared(p, snap, tier)
    if stage is Stage.SHADOW:
        prompt = work_prompt(job.kind, job.payload, shared=shared)
        max_tokens = p.models.limits.work_max_tokens
        if shared is not None and shared.definition.get("max_tokens"):
            max_tokens = min(max_tokens, shared.definition["max_tokens"])
    else:
        prompt = judge_prompt(job.kind, job.payload, routed=as_text(job.output), reference=c.reference_answer or "",
                              shared=shared)
        max_tokens = p.models.limits.format_check_max_tokens
    # An economy batch's shadows go through message batches too, keyed by the job's final version
    # (a succeeded job's version no longer moves).
    economy_call = economy.economy_call(p, job_id=job_id, version=job.version, batch_id=job.batch_id,
                                        task_id=job.task_id, purpose=stage.value, call_id=call_id)
    # Reserved against the tenant's daily limit (pipeline.flow.budgets.reserve_evaluation); when it
    # has no room, the step waits: RESERVE_RETRY_S, or the next UTC day if that comes first.
    if budgets.hold_call(p, job_id=job_id, version=job.version, call_id=call_id, tier=tier, prompt=prompt,
                         max_tokens=max_tokens, economy_purpose=economy_call.purpose if economy_call else None,
                         evaluation=True) is not None:
        now = utcnow()
        retry = min(now + timedelta(seconds=RESERVE_RETRY_S),
                    now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1))
        p.run(lambda s: _record(s, p, c, call_id, snap, stage, tier, [], release_at=retry))
        return None
    result = call_model(p, tier=tier, prompt=prompt, max_tokens=max_tokens, on_retry=lambda _n: _renew(p, c),
                        job_id=job_id, economy_call=economy_call)
    if isinstance(result, Deferred) and not result.attempts:
        # Handed back unmade: its call row goes, and its reservation with it (a parked call's has
        # moved to its request).
        budgets.take(call_id)
    if isinstance(result, Parked):
        # Its request waits in a message batch: the step waits in Postgres, and the dispatcher's
        # economy round wakes it (not_before = now) when the answer is stored, for the sweep.
        p.run(lambda s: _record(s, p, c, call_id, snap, stage, tier, [], release_at=result.until))
        return None
    if isinstance(result, Deferred):
        p.run(lambda s: _record(s, p, c, call_id, snap, stage, tier, result.attempts, release_at=None))
        return handoff(job_id, c.reference_tier, delay_s=min(60.0, result.wait_s) + random.uniform(0, 1))
    if isinstance(result, CallFailed):
        if result.transient and (utcnow() - c.created_at).total_seconds() < p.transient_patience_s:
            wait = max(p.transient_wait_min_s * random.uniform(1.0, 1.25), result.retry_after or 0.0)
            p.run(lambda s: _record(s, p, c, call_id, snap, stage, tier, result.attempts,
                                    release_at=utcnow() + timedelta(seconds=wait)))
            return None
        p.run(lambda s: _record(s, p, c, call_id, snap, stage, tier, result.attempts, to=F,
                                values={"error": f"{stage.value} call to {tier} failed: {result}"[:2000]}))
        return None
    to, values = _outcome(stage, job, result)
    moved = p.run(lambda s: _record(s, p, c, call_id, snap, stage, tier, result.attempts, to=to, values=values))
    return handoff(job_id, c.reference_tier) if moved and to is J else None


def _step(c: ShadowClaim) -> tuple[Stage, str]:
    """The call this step makes: the judge's once the reference has answered, else the reference's."""
    if c.status is J:
        assert c.judge_tier is not None
        return Stage.JUDGE, c.judge_tier
    return Stage.SHADOW, c.reference_tier


def _outcome(stage: Stage, job: _Job, result: CallResult) -> tuple[ShadowStatus, dict[str, Any]]:
    """Where the shadow goes on an answer, and what it records."""
    if stage is Stage.JUDGE:
        verdict = parse_judge(result.text)
        if verdict is None:
            return F, {"error": "the judge's answer is no verdict (not JSON with a boolean \"as_good\")"}
        return D, _agreement(verdict)
    bad = check_stop(result.text, result.stop_reason)
    if bad is None and job.kind in (JobKind.DRAFT, JobKind.GENERATE):
        return J, {"reference_answer": result.text}
    checked = bad or deterministic_check(job.kind, job.payload, result.text)
    assert checked is not None  # classify and extract are checked by rule
    if not checked.ok:
        # A reference that fails the job's own checks is no reference to measure against.
        return F, {"reference_answer": result.text,
                   "error": f"the reference answer did not pass validation: {checked.feedback}"[:2000]}
    compare = same_label if job.kind is JobKind.CLASSIFY else same_fields
    return D, {"reference_answer": result.text, **_agreement(compare(job.output, checked.output))}


def _agreement(a: Agreement) -> dict[str, Any]:
    return {"agreement": a.score, "agreed": a.agreed, "fields_total": a.fields_total, "fields_equal": a.fields_equal,
            "judge_reason": a.reason}


def _record(session: Connection, p: Pipeline, c: ShadowClaim, call_id: int, snap: Claim, stage: Stage, tier: str,
            attempts: list[Any], *, to: ShadowStatus | None = None, values: dict[str, Any] | None = None,
            release_at: datetime | None = None) -> bool:
    """The call's record and the shadow's move (or hand-back), in one transaction. The calls' cost
    goes on the shadow, moved or not: it was paid, and it is evaluation cost, not the job's.

    Run again by Pipeline.run after its commit's acknowledgement was lost, it finds its call row
    closed (or deleted), and only says whether that first run moved the shadow: recording the call
    again would count its cost twice."""
    if replaying(session) and session.scalar(select(_CALLS.c.outcome).where(_CALLS.c.id == call_id)) != "started":
        return bool(session.scalar(select(_SHADOWS.c.version).where(_SHADOWS.c.id == c.id)) != c.version)
    if to is None:
        moved = release(session, c, not_before=release_at)
        applied: bool | None = False
    else:
        moved = move(session, c, to=to, **(values or {}))
        applied = None
    if attempts:
        writes: list[Also] = _call_writes(p, call_id=call_id, claim=snap, stage=stage, tier=tier, attempts=attempts,
                                          applied=applied)
        for write in writes:
            write.execute(session, moved=moved)
    else:
        session.execute(_CALLS.delete().where(_CALLS.c.id == call_id))
    cost = _total_cost(p, tier, attempts)
    if cost:
        session.execute(update(_SHADOWS).where(_SHADOWS.c.id == c.id)
                        .values(cost_usd=_SHADOWS.c.cost_usd + cost))
    return moved


def _renew(p: Pipeline, c: ShadowClaim) -> None:
    """Show the sweep that the worker on this step is alive (it is starting another attempt). Best
    effort, as for a job's stage: a missed renewal costs at worst a duplicate, which the conditional
    moves absorb, while blocking on a database outage would hold up a call already paid for."""
    try:
        with p.engine.begin() as conn:
            conn.execute(update(_SHADOWS).where(_SHADOWS.c.id == c.id, _SHADOWS.c.version == c.version)
                         .values(claimed_at=utcnow()))
    except OperationalError as exc:
        log.warning("job %s: could not renew the shadow step's claim: %s", c.job_id, exc.orig or exc)


def sweep(session: Executor, *, deadline_s: float, claim_deadline_s: float, lost_before: datetime | None = None,
          now: datetime | None = None, limit: int = 1000) -> list[Handoff]:
    """Publish again the open shadow steps that are due (their wait after transient errors is
    over), whose worker shows no sign of life for ``claim_deadline_s``, or whose message has waited
    unclaimed for ``deadline_s`` (or since the broker lost its data, ``lost_before``). A shadow
    step may wait long in its queue behind the tier's own work; republished, it is a duplicate,
    which the conditional claim absorbs, and its clock restarts, so it is sent again at most once
    a deadline."""
    now = now or utcnow()
    s = _SHADOWS.c
    lost_cutoff = now - timedelta(seconds=deadline_s)
    if lost_before is not None:
        lost_cutoff = max(lost_cutoff, lost_before)
    rows = session.execute(
        select(s.id, s.job_id, s.reference_tier)
        .where(s.status.in_(OPEN_SHADOW),
               or_(s.not_before <= now, s.claimed_at < now - timedelta(seconds=claim_deadline_s),
                   and_(s.claimed_at.is_(None), s.not_before.is_(None), s.updated_at < lost_cutoff)))
        .order_by(s.updated_at).limit(limit).with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    session.execute(update(_SHADOWS).where(s.id.in_([r.id for r in rows]))
                    .values(not_before=None, claimed_at=None, updated_at=now))
    return [handoff(r.job_id, r.reference_tier) for r in rows]

