"""The three stages, as plain functions: triage, work, validate.

Each one begins the stage on a job (a conditional claim), makes its model call with no database
connection held, then records the call and moves the job in one transaction, and says where the
job goes next. Publishing that hand-off is the caller's job, after the commit: these functions never
touch the broker, so they are tested with nothing but a database and the fake Claude.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, Table, delete, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.client import MAX_RETRY_AFTER_S, Attempt, CallResult, ModelClient
from pipeline.claude.pricing import call_cost
from pipeline.config import ModelConfig
from pipeline.errors import CallFailed, Deferred
from pipeline.flow import budgets, economy
from pipeline.flow.prompts import Prompt, Shared, format_check_prompt, triage_prompt, work_prompt
from pipeline.flow.routing import after_failed_validation, parse_triage, tier_for
from pipeline.flow.states import (
    Also,
    Claim,
    begin_stage,
    begin_stage_with_call,
    last_step,
    moved_at,
    release_stage,
    renew_claim,
    transition,
)
from pipeline.flow.validation import (
    Verdict,
    format_check_unreadable,
    parse_format_check,
    quick_verdict,
)
from pipeline.flow.warmup import Admission, WarmupGate, prefix_key
from pipeline.models import (
    EconomyRequest,
    Job,
    JobKind,
    JobStatus,
    ModelCall,
    RoutingDecision,
    ShadowEvaluation,
    Stage,
    Task,
    ValidationVerdict,
    utcnow,
)
from pipeline.quality.sample import effective_rate, sampled_row

T = TypeVar("T")
log = logging.getLogger(__name__)

WORK, VALIDATE, TRIAGE = "work", "validate", "triage"
# kombu's Redis transport serves a queue's priority lists in order, 0 (where every unprioritised
# message goes) first and 9 last: a worker takes a shadow step only when no job's stage waits.
SHADOW_PRIORITY = 9


@dataclass(frozen=True)
class Handoff:
    """Where a job goes next: a stage and the queue that serves it."""

    stage: str  # triage | work | validate
    job_id: int
    queue: str
    # Publish with this countdown: the same stage handed back to wait for its tier's rate limit.
    delay_s: float = 0.0
    # The message's priority on its queue; None: the default, which goes first (a shadow step,
    # pipeline.flow.shadow, goes last).
    priority: int | None = None

# A hand-back waits at most this long in the broker; if the tier is still busy it is handed back
# again. Far below any stage deadline, so the sweeper never takes a waiting job for a lost one.
MAX_DEFER_S = 60.0


@dataclass
class Pipeline:
    """What the stages need, built once per process by an entry point."""

    sessions: sessionmaker[Session]
    client: ModelClient
    models: ModelConfig
    max_deliveries: int = 3
    db_retry_s: float = 60.0
    # How long a claimed stage may show no sign of life before another delivery may take it over
    # (and the sweeper republishes it): longer than one call attempt plus its backoff.
    claim_deadline_s: float = 300.0
    # This process's identity in its heartbeat (pipeline.queries.ops.Heartbeat), written on every claim it
    # takes; None where no heartbeat runs (the embedded demo, `celery -A workers worker`).
    worker_id: str | None = None
    # A stage whose call meets only transient errors until its attempts run out waits and tries
    # again (``_after_transient``): as long as it has already waited, within these bounds. Its job
    # fails once the stage has met nothing but transient errors for ``transient_patience_s``.
    transient_patience_s: float = 3600.0
    transient_wait_min_s: float = 10.0
    transient_wait_max_s: float = 300.0
    # Lets one call at a time warm a cached prompt prefix (pipeline.flow.warmup); None: every call
    # goes at once, and those fired together each write the prefix.
    warmup: WarmupGate | None = field(default_factory=WarmupGate)

    @property
    def engine(self) -> Engine:
        return cast(Engine, self.sessions.kw["bind"])

    def run(self, fn: Callable[[Connection], T], *, autocommit: bool = False) -> T:
        """Run ``fn`` in one transaction, retrying if the database connection drops.

        With ``autocommit`` there is no transaction around ``fn``: each of its statements commits
        on its own, sparing the BEGIN and COMMIT round trips, for units whose statements need not
        stand or fall together. A retry then runs ``fn`` again over what already committed.

        ``fn`` gets a Core Connection, not an ORM Session: every stage of every job runs a few of
        these, and the Session's per-transaction bookkeeping (snapshots, autobegin, the ORM
        execution layer) cost more CPU than the statements, which are all Core (bench/).

        A Postgres restart must not lose a model call that already cost money: a dead pooled
        connection fails the unit of work (SQLAlchemy then discards it and the pool's other stale
        connections), and this retries it until the server is back (bounded by ``db_retry_s``).
        That is also why the pipeline's engine has no pre-ping (runtime.build_pipeline)."""
        delay, waited = 0.2, 0.0
        while True:
            try:
                with self._unit(autocommit) as conn:
                    # Only a retried unit of work can follow a commit whose acknowledgement was
                    # lost; a first run need not look for its own earlier commit (_applied_before).
                    # An execution option lives as long as this checkout, unlike Connection.info,
                    # which stays with the pooled connection.
                    conn.execution_options(**{REPLAY: waited > 0})
                    return fn(conn)
            except OperationalError as exc:
                # OperationalError is the driver's word for a lost or refused connection; a
                # constraint or programming error is a different class and is raised at once.
                if waited >= self.db_retry_s or not _worth_retrying(exc):
                    raise
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    def record(self, fn: Callable[[Connection], T]) -> T:
        """Run a stage's result: on Postgres one statement (states.Also), so in autocommit, sparing
        BEGIN and COMMIT; elsewhere the same writes as separate statements in one transaction."""
        return self.run(fn, autocommit=self.engine.dialect.name == "postgresql")

    def _unit(self, autocommit: bool) -> AbstractContextManager[Connection]:
        if not autocommit:
            return self.engine.begin()
        conn = self.engine.connect()
        conn.execution_options(isolation_level="AUTOCOMMIT")  # a client-side switch: no round trip
        return conn


REPLAY = "switchyard_replay"


def replaying(conn: Connection) -> bool:
    """True in a unit of work that Pipeline.run is running again after a lost connection."""
    return bool(conn.get_execution_options().get(REPLAY))


def _worth_retrying(exc: OperationalError) -> bool:
    """SQLite reports syntax errors as OperationalError too; of its errors only a busy database is
    worth waiting for. On Postgres every OperationalError is a connection that went away."""
    if exc.connection_invalidated:
        return True
    if type(exc.orig).__module__.startswith("sqlite3"):
        return "locked" in str(exc.orig) or "busy" in str(exc.orig)
    return True


def handoff_for(job_id: int, status: JobStatus, tier: str | None) -> Handoff | None:
    if status is JobStatus.TRIAGING:
        return Handoff(TRIAGE, job_id, "triage")
    if status is JobStatus.WORKING and tier:
        return Handoff(WORK, job_id, tier)
    if status is JobStatus.VALIDATING:
        return Handoff(VALIDATE, job_id, "validate")
    return None


# -- recording calls ---------------------------------------------------------------------------


# The hot path writes through Core on the tables, not ORM objects and a unit-of-work flush: the
# rows are write-only here, and the ORM's bookkeeping cost more CPU than the SQL (see bench/).
_JOBS, _CALLS = cast(Table, Job.__table__), cast(Table, ModelCall.__table__)
_DECISIONS, _VERDICTS = cast(Table, RoutingDecision.__table__), cast(Table, ValidationVerdict.__table__)
_SHADOWS = cast(Table, ShadowEvaluation.__table__)
_ECONOMY_REQUESTS = cast(Table, EconomyRequest.__table__)


# ...and statements built once, executed with bound parameters.
_INSERT_CALL = insert(_CALLS).returning(_CALLS.c.id)


def _start_call(session: Connection, p: Pipeline, claim: Claim, *, stage: Stage, tier: str) -> int:
    """Write the call's row before making it, so a call whose worker dies is still on record."""
    return session.execute(_INSERT_CALL, {  # type: ignore[no-any-return]
        "job_id": claim.id, "stage": stage, "tier": tier, "model": p.models.tier(tier).model, "attempt": 1,
        "outcome": "started", "delivery": claim.deliveries, "started_at": utcnow()}).scalar_one()


def _cost(p: Pipeline, tier: str, attempt: Attempt) -> Decimal:
    return (call_cost(p.models.tier(tier), attempt.usage, config=p.models, batch=attempt.message_batch_id is not None)
            if attempt.ok else Decimal(0))


def _total_cost(p: Pipeline, tier: str, attempts: Iterable[Attempt]) -> Decimal:
    return sum((_cost(p, tier, a) for a in attempts), Decimal(0))


def _call_writes(p: Pipeline, *, call_id: int, claim: Claim, stage: Stage, tier: str, attempts: Iterable[Attempt],
                 applied: bool | None = None) -> list[Also]:
    """The call's record: its started row filled in with the first attempt, a row for each retry.

    A successful attempt is ``applied`` if the transition it goes with moves the job (None), or
    never (False: the stage is failing or handing the job back). A delivery that lost the race to
    move the job made calls that happened and cost money, but did not count."""
    tier_cfg = p.models.tier(tier)
    flag = "applied" if applied is None else None
    first: list[Also] = []
    retries: list[dict[str, Any]] = []
    for a in attempts:
        values = dict(
            outcome="ok" if a.ok else "error", attempt=a.number,
            input_tokens=a.usage.input_tokens, output_tokens=a.usage.output_tokens,
            cache_creation_input_tokens=a.usage.cache_creation_input_tokens,
            cache_read_input_tokens=a.usage.cache_read_input_tokens,
            cost_usd=_cost(p, tier, a), latency_ms=a.latency_ms, request_id=a.request_id, status_code=a.status_code,
            stop_reason=a.stop_reason, error_type=a.error_type, error_message=a.error_message,
            response_text=a.text, applied=a.ok and applied is not False, started_at=a.started_at,
            finished_at=a.finished_at, message_batch_id=a.message_batch_id,
        )
        if a.number == 1:
            first.append(Also(_CALLS, row_id=call_id, values=values, when="always", moved_flag=flag))
        else:
            retries.append({"job_id": claim.id, "stage": stage, "tier": tier, "model": tier_cfg.model,
                            "delivery": claim.deliveries, **values})
    writes = first + ([Also(_CALLS, rows=retries, when="always", moved_flag=flag)] if retries else [])
    # An economy call's answer is read once: its request is marked consumed with the call's record.
    read = [Also(_ECONOMY_REQUESTS, row_id=a.economy_request_id, values={"consumed_at": utcnow()}, when="always")
            for a in attempts if a.economy_request_id is not None]
    # The call's budget reservation, if it made one, replaced by its actual cost in the same statement.
    return writes + read + budgets.settle_writes(budgets.take(call_id), _total_cost(p, tier, attempts))


def _stale_cost(job_id: int, cost: Decimal) -> list[Also]:
    """The job's cost grows by its calls' even when the transition finds it moved on: they were paid."""
    return [Also(_JOBS, row_id=job_id, add={"cost_usd": cost}, when="stale")] if cost else []


def _applied_before(session: Connection, call_id: int | None) -> bool:
    """True if this very call was already applied: Pipeline.run is replaying a transaction whose
    commit reached Postgres but whose acknowledgement was lost with the connection (a restart, a
    dropped backend). Replaying it would find the job moved, record the call as not applied and
    count its cost twice, and drop the hand-off; instead the stage returns its hand-off again.

    A result with no call (a deterministic verdict) has no row to tell; validate looks for its own
    stamped move instead (states.moved_at)."""
    if call_id is None or not replaying(session):
        return False
    # The stage records its call in the same transaction as the move; nobody else ever writes "ok"
    # or "error" on this row. (When the first commit had lost the race, the hand-off returned
    # again is a harmless duplicate.)
    return session.scalar(select(ModelCall.outcome).where(ModelCall.id == call_id)) in ("ok", "error")


def _add_cost(session: Connection, job_id: int, cost: Decimal) -> None:
    if cost:
        session.execute(update(_JOBS).where(_JOBS.c.id == job_id).values(cost_usd=_JOBS.c.cost_usd + cost))


# -- the stage skeleton --------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstCall:
    """The call a stage always makes once it holds the job: its started row can be written by the
    claim's own statement. ``tier`` None: the job's tier (the work stage)."""

    stage: Stage
    tier: str | None = None


def _claim(p: Pipeline, job_id: int, status: JobStatus,
           call: FirstCall | Callable[[Claim], tuple[Stage, str] | None] | None = None
           ) -> tuple[Claim, int | None] | None:
    """Begin the stage; fail a poison job; write the started call row if ``call`` asks for one:
    always (a FirstCall), or as the claimed job decides (a function of the claim).

    Each statement commits on its own (Pipeline.run's autocommit): none needs the others to stand.
    On Postgres a FirstCall's row is written by the claim's own statement; elsewhere, or for a
    call decided by the claim, a worker that dies after the claim and before the call row has
    made no call, and the next claim counts its delivery. A retry after a lost connection replays
    the claim with the same stamp (begin_stage) and closes any call row the first run had already
    written."""
    now = utcnow()
    together = isinstance(call, FirstCall) and p.engine.dialect.name == "postgresql"

    def do(session: Connection) -> tuple[Claim, int | None] | None:
        call_id: int | None = None
        if together:
            assert isinstance(call, FirstCall)
            claimed = begin_stage_with_call(
                session, job_id, status=status, claim_deadline_s=p.claim_deadline_s, now=now, worker=p.worker_id,
                stage=call.stage, tier=call.tier, models={name: t.model for name, t in p.models.tiers.items()},
                max_deliveries=p.max_deliveries)
            if claimed is None:
                return None
            claim, call_id = claimed
        else:
            begun = begin_stage(session, job_id, status=status, claim_deadline_s=p.claim_deadline_s, now=now,
                                worker=p.worker_id)
            if begun is None:
                return None
            claim = begun
        if claim.deliveries > 1 or replaying(session):
            # A call row of this job still "started" (other than the one just written) belongs to
            # an earlier claim of this stage that is dead (a live one would have kept us out). The
            # sweeper closes such rows when it republishes, but a duplicate message can take over a
            # stale claim before the sweeper gets to it. The first claim of a stage has no such
            # predecessor: every move into a stage, and every hand-back (release_stage), closes the
            # call row it came from in the same transaction, so that case skips the statement.
            session.execute(
                update(ModelCall).where(ModelCall.job_id == job_id, ModelCall.outcome == "started",
                                        ModelCall.id != (call_id or 0))
                .values(outcome="abandoned", finished_at=utcnow()).execution_options(synchronize_session=False))
        if claim.deliveries > p.max_deliveries:
            return claim, None
        if not together:
            wanted = ((call.stage, call.tier or claim.tier or "") if isinstance(call, FirstCall)
                      else call(claim) if call else None)
            call_id = _start_call(session, p, claim, stage=wanted[0], tier=wanted[1]) if wanted else None
        return claim, call_id

    claimed = p.run(do, autocommit=True)
    if claimed is not None and claimed[0].deliveries > p.max_deliveries:
        claim = claimed[0]
        # A transition is a unit of its own (the move and its event row together).
        p.run(lambda session: transition(
            session, job_id, frm=status, version=claim.version, to=JobStatus.FAILED, detail="poison",
            error=f"poison job: the {status.value} stage was started {claim.deliveries - 1} times and never "
                  f"finished (did it kill its worker?)", failure_reason=f"poison job ({status.value} stage)"))
        return None
    return claimed


# Task versions never change once stored, so a worker reads each one once: (database, task id) -> definition.
_TASKS: dict[tuple[str, int], dict[str, Any]] = {}
_TASKS_KEPT = 256


def _shared(p: Pipeline, claim: Claim, tier: str) -> Shared | None:
    """The task's shared part of a task job's prompts at ``tier``; None for a job without a task."""
    if claim.task_id is None:
        return None
    key = (str(p.engine.url), claim.task_id)
    definition = _TASKS.get(key)
    if definition is None:
        with p.engine.connect() as conn:
            definition = conn.scalar(select(Task.definition).where(Task.id == claim.task_id))
        assert definition is not None  # jobs.task_id is a foreign key, and versions are never deleted
        if len(_TASKS) >= _TASKS_KEPT:
            _TASKS.clear()
        _TASKS[key] = definition
    return Shared(definition, p.models.min_cache_tokens(tier) if p.models.caching else None)


def _call(p: Pipeline, claim: Claim, *, tier: str, prompt: Prompt, max_tokens: int,
          stage: Stage, call_id: int) -> CallResult | CallFailed | Deferred:
    def renew(_attempt: int) -> None:
        # Best effort and without Pipeline.run's retries: a missed renewal costs at worst a
        # duplicate delivery (which the version check absorbs), while blocking here on a database
        # outage would hold up a call that is already paid for.
        try:
            with p.engine.begin() as conn:
                renew_claim(conn, claim.id, version=claim.version)
        except OperationalError as exc:
            log.warning("job %s: could not renew the stage claim: %s", claim.id, exc.orig or exc)

    economy_call = economy.economy_call(p, job_id=claim.id, version=claim.version, batch_id=claim.batch_id,
                                        task_id=claim.task_id, purpose=stage.value, call_id=call_id)
    # The call's worst case reserved against its budgets first (pipeline.flow.budgets), or, for an
    # economy call whose request already holds it, taken over; a call that does not fit is not
    # made, and its job is paused already. A job under no budget skips the reservation's
    # transaction: the claim said so (states.Claim.budgeted).
    if claim.budgeted or economy_call is not None:
        paused = budgets.hold_call(p, job_id=claim.id, version=claim.version, call_id=call_id, tier=tier,
                                   prompt=prompt, max_tokens=max_tokens,
                                   economy_purpose=economy_call.purpose if economy_call else None)
        if paused is not None:
            return paused
    result = call_model(p, tier=tier, prompt=prompt, max_tokens=max_tokens, on_retry=renew, job_id=claim.id,
                        economy_call=economy_call)
    if isinstance(result, Deferred) and not result.attempts:
        # Handed back unmade (a rate-limit or warm-up wait, or an economy call parked until its
        # message batch answers): its call row goes, and the reservation with it (a parked call's
        # reservation has moved to its request: economy._write).
        budgets.take(call_id)
    return result


def call_model(p: Pipeline, *, tier: str, prompt: Prompt, max_tokens: int, on_retry: Callable[[int], None],
               job_id: int, economy_call: economy.EconomyCall | None = None) -> CallResult | CallFailed | Deferred:
    """One model call as every step makes it (a job's stages, and shadow evaluation's): the
    structured output the tier takes, and the cache warm-up gate before a call through a cached
    prefix. ``on_retry`` renews the step's claim before each retry. ``economy_call``: the job is in
    economy mode, and the answer comes from a message batch (pipeline.flow.economy) unless its
    request expired twice."""
    cfg = p.models.tier(tier)
    output_schema = prompt.output_schema if cfg.structured_outputs else None
    if economy_call is not None:
        # No warm-up gate: a message batch's requests run together whatever order they come in.
        answer = economy.obtain(p, economy_call, tier=tier, model=cfg.model, system=prompt.system, user=prompt.user,
                                max_tokens=max_tokens, cache_system=prompt.cache, cache_ttl=cfg.cache_ttl,
                                output_schema=output_schema)
        if answer is not None:
            return answer
    gate = p.warmup if prompt.cache else None
    admission: Admission | None = None
    if gate is not None:
        key = prefix_key(cfg.model, system=prompt.system, ttl=cfg.cache_ttl, output_schema=output_schema)
        admission = p.run(lambda conn: gate.admit(conn, key, now=utcnow()), autocommit=True)
        if not admission.go:
            # Another call is writing this prefix to the cache. The job goes back to its queue for
            # the wait, by the rate-limit deferral (_defer: no delivery counted, the call row
            # dropped), rather than waiting here: a warm-up can take as long as a whole call, and
            # a batch's jobs would all sit in worker threads meanwhile, holding back the jobs of
            # other tasks and stages that could run now.
            log.debug("job %s: the %s prefix is being warmed; asking again in %.1f s", job_id, tier,
                      admission.wait_s)
            return Deferred(tier, admission.wait_s, [])
    try:
        result = p.client.call(tier=tier, model=cfg.model, system=prompt.system, user=prompt.user,
                               max_tokens=max_tokens, on_retry=on_retry, cache_system=prompt.cache,
                               cache_ttl=cfg.cache_ttl, output_schema=output_schema)
    except (CallFailed, Deferred) as outcome:
        if gate is not None and admission is not None and admission.lease is not None:
            held = admission
            p.run(lambda conn: gate.release(conn, held), autocommit=True)
        return outcome
    if gate is not None and admission is not None:
        _warmed(p, gate, admission, ttl_s=cfg.cache_ttl_s, started=result.attempts[-1].started_at)
    return result


def _warmed(p: Pipeline, gate: WarmupGate, admission: Admission, *, ttl_s: float, started: datetime) -> None:
    """An answered call through a cached prefix: the warmer's always marks it warm (and gives the
    lease up); a later one pushes its warmth on only when due (WarmupGate.due)."""
    if admission.lease is not None or gate.due(admission.key, now=utcnow(), ttl_s=ttl_s):
        until = started + timedelta(seconds=ttl_s)
        p.run(lambda conn: gate.warmed(conn, admission.key, until=until), autocommit=True)


def _handed_back_before(session: Connection, call_id: int) -> bool:
    """True if this hand-back already committed: Pipeline.run is replaying it after its
    acknowledgement was lost with the connection. The hand-back either filled the call row in
    (its attempts) or deleted it (no attempt was made); either way the row is no longer "started"."""
    if not replaying(session):
        return False
    return session.scalar(select(ModelCall.outcome).where(ModelCall.id == call_id)) in (None, "ok", "error")


def _hand_back(p: Pipeline, claim: Claim, call_id: int, *, status: JobStatus, stage: Stage, tier: str,
               attempts: list[Attempt], not_before: datetime | None = None,
               transient_since: datetime | None = None, parked: bool = False) -> bool:
    """Record the attempts made (a call that never started leaves no row), and release the stage's
    claim without counting a delivery (states.release_stage). True if the job was still there."""

    def do(session: Connection) -> bool:
        if _handed_back_before(session, call_id):
            return True
        if attempts:
            for write in _call_writes(p, call_id=call_id, claim=claim, stage=stage, tier=tier,
                                      attempts=attempts, applied=False):
                write.execute(session, moved=False)
            _add_cost(session, claim.id, _total_cost(p, tier, attempts))
        else:
            session.execute(delete(ModelCall).where(ModelCall.id == call_id)
                            .execution_options(synchronize_session=False))
        return release_stage(session, claim.id, status=status, version=claim.version, not_before=not_before,
                             transient_since=transient_since, parked=parked)

    return p.run(do)


def _defer(p: Pipeline, claim: Claim, call_id: int, *, status: JobStatus, stage: Stage, tier: str,
           deferred: Deferred) -> Handoff | None:
    """Hand the job back to its queue until the tier's budget has room, instead of holding a
    worker thread (pipeline.claude.ratelimit says when that happens). Attempts already made (a 429 that
    paused the tier) are recorded and start the stage's patience, as any transient error does.
    An economy call waiting in a message batch (economy.Parked) parks the job in Postgres instead,
    with no message: the dispatcher wakes it when the answer is stored."""
    if isinstance(deferred, economy.Parked):
        _hand_back(p, claim, call_id, status=status, stage=stage, tier=tier, attempts=[], not_before=deferred.until,
                   parked=True)
        return None
    if deferred.attempts and _patience_spent(p, claim, call_id, status=status, stage=stage, tier=tier,
                                             attempts=deferred.attempts):
        return None
    since = deferred.attempts[0].started_at if deferred.attempts else None
    if not _hand_back(p, claim, call_id, status=status, stage=stage, tier=tier, attempts=deferred.attempts,
                      transient_since=since):
        return None
    again = handoff_for(claim.id, status, claim.tier)
    if again is None:
        return None
    # Jitter spreads the handed-back jobs over the refill instead of returning them all at once.
    return replace(again, delay_s=min(MAX_DEFER_S, deferred.wait_s) + random.uniform(0, 1))


def _label(status: int | None, error_type: str | None) -> str:
    """An API error in a few words: "429 rate_limit_error", or "timeout" when no answer came."""
    return f"{status} {error_type}" if status else error_type or "error"


def _duration(seconds: float) -> str:
    """3660 -> "1 h 1 min", 600 -> "10 min", 0 -> "0 s"."""
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return " ".join(f"{n} {unit}" for n, unit in ((h, "h"), (m, "min"), (s, "s")) if n) or "0 s"


def _fail(p: Pipeline, claim: Claim, call_id: int, *, status: JobStatus, stage: Stage, tier: str,
          attempts: list[Attempt], error: str, reason: str) -> None:
    """Fail the job after its call: the call's attempts recorded, the error and its short reason."""
    cost = _total_cost(p, tier, attempts)
    writes = [*_call_writes(p, call_id=call_id, claim=claim, stage=stage, tier=tier, attempts=attempts,
                            applied=False), *_stale_cost(claim.id, cost)]
    p.record(lambda session: transition(session, claim.id, frm=status, version=claim.version, to=JobStatus.FAILED,
                                        error=error, failure_reason=reason[:200], detail=f"{stage.value} call failed",
                                        add={"cost_usd": cost}, also=writes))


def _patience_spent(p: Pipeline, claim: Claim, call_id: int, *, status: JobStatus, stage: Stage, tier: str,
                    attempts: list[Attempt]) -> bool:
    """Fail the job if its stage has met nothing but transient errors for longer than the patience,
    counted from the first of them (this call's first attempt, unless an earlier round met one
    before); True if it did. ``attempts``: this call's, every one of them failed."""
    waited = (utcnow() - (claim.transient_since or attempts[0].started_at)).total_seconds()
    if waited < p.transient_patience_s:
        return False
    last = attempts[-1]
    error = (f"{stage.value} call to {tier} failed: only transient errors for {_duration(waited)}, past the "
             f"patience of {_duration(p.transient_patience_s)} (SWITCHYARD_TRANSIENT_PATIENCE_S); the last: "
             f"{last.error_message}")
    _fail(p, claim, call_id, status=status, stage=stage, tier=tier, attempts=attempts, error=error,
          reason=f"{stage.value} call to {tier}: transient errors past the patience "
                 f"(last {_label(last.status_code, last.error_type)})")
    return True


def _after_transient(p: Pipeline, claim: Claim, call_id: int, *, status: JobStatus, stage: Stage, tier: str,
                     failed: CallFailed) -> None:
    """Every attempt of the call met a transient error (429, 529, 5xx, a timeout, a dropped
    connection). Overloads come in bursts that last minutes, so the job does not fail: the stage
    releases its claim and waits in Postgres, and the dispatcher publishes it again when the wait is
    over (dispatch.refeed). The wait lasts as long as the stage has already waited since its first
    transient error (so it doubles from round to round, like any backoff, without a counter),
    within [transient_wait_min_s, transient_wait_max_s], plus up to a quarter more so that jobs hit
    by the same burst come back spread out; never less than the last retry-after, and never past
    the patience, when the stage has its last try and the job fails if that fails too."""
    if _patience_spent(p, claim, call_id, status=status, stage=stage, tier=tier, attempts=failed.attempts):
        return
    since = failed.attempts[0].started_at
    now = utcnow()
    waited = (now - (claim.transient_since or since)).total_seconds()
    wait = min(max(waited, p.transient_wait_min_s), p.transient_wait_max_s) * random.uniform(1.0, 1.25)
    wait = min(wait, p.transient_patience_s - waited)
    if failed.retry_after is not None:
        wait = max(wait, min(failed.retry_after, MAX_RETRY_AFTER_S))
    if _hand_back(p, claim, call_id, status=status, stage=stage, tier=tier, attempts=failed.attempts,
                  not_before=now + timedelta(seconds=wait), transient_since=since):
        log.info("job %s: %s call to %s met only transient errors (the last: %s); trying again in %.0f s",
                 claim.id, stage.value, tier, _label(failed.status, failed.error_type), wait)


def _after_call_failed(p: Pipeline, claim: Claim, call_id: int, *, status: JobStatus, stage: Stage, tier: str,
                       failed: CallFailed) -> None:
    if failed.transient:
        _after_transient(p, claim, call_id, status=status, stage=stage, tier=tier, failed=failed)
        return
    _fail(p, claim, call_id, status=status, stage=stage, tier=tier, attempts=failed.attempts,
          error=f"{stage.value} call to {tier} failed (permanent error): {failed}",
          reason=f"{stage.value} call to {tier}: {_label(failed.status, failed.error_type)}")


# -- triage ----------------------------------------------------------------------------------------


def triage(p: Pipeline, job_id: int) -> Handoff | None:
    tier = p.models.triage_tier
    claimed = _claim(p, job_id, JobStatus.TRIAGING, FirstCall(Stage.TRIAGE, tier))
    if claimed is None:
        return None
    claim, call_id = claimed
    assert call_id is not None
    result = _call(p, claim, tier=tier, prompt=triage_prompt(claim.kind, claim.payload, shared=_shared(p, claim, tier)),
                   max_tokens=p.models.limits.triage_max_tokens, stage=Stage.TRIAGE, call_id=call_id)
    if isinstance(result, Deferred):
        return _defer(p, claim, call_id, status=JobStatus.TRIAGING, stage=Stage.TRIAGE, tier=tier, deferred=result)
    if isinstance(result, CallFailed):
        _after_call_failed(p, claim, call_id, status=JobStatus.TRIAGING, stage=Stage.TRIAGE, tier=tier,
                         failed=result)
        return None

    verdict = parse_triage(result.text, min_confidence=p.models.routing.min_confidence,
                           stop_reason=result.stop_reason)
    target = tier_for(verdict, p.models.routing)

    cost = _total_cost(p, tier, result.attempts)
    writes = [
        *_call_writes(p, call_id=call_id, claim=claim, stage=Stage.TRIAGE, tier=tier, attempts=result.attempts),
        *_stale_cost(job_id, cost),
        Also(_DECISIONS, rows=[{"job_id": job_id, "reason_kind": "triage", "verdict": verdict.difficulty,
                          "triaged_as": verdict.triaged_as, "confidence": verdict.confidence,
                          "reason": verdict.reason, "from_tier": None,
                          "to_tier": target, "created_at": utcnow()}]),
    ]

    def do(session: Connection) -> Handoff | None:
        if _applied_before(session, call_id):
            return Handoff(WORK, job_id, target)
        moved = transition(session, job_id, frm=JobStatus.TRIAGING, version=claim.version,
                           to=JobStatus.WORKING, detail=f"triage: {verdict.difficulty} -> {target}",
                           difficulty=verdict.difficulty, tier=target, attempt=1, add={"cost_usd": cost}, also=writes)
        return Handoff(WORK, job_id, target) if moved else None

    return p.record(do)


# -- work --------------------------------------------------------------------------------------------


def work(p: Pipeline, job_id: int) -> Handoff | None:
    claimed = _claim(p, job_id, JobStatus.WORKING, FirstCall(Stage.WORK))
    if claimed is None:
        return None
    claim, call_id = claimed
    assert call_id is not None and claim.tier is not None
    tier = claim.tier
    shared = _shared(p, claim, tier)
    max_tokens = p.models.limits.work_max_tokens
    if shared is not None and shared.definition.get("max_tokens"):
        # A task may ask for shorter answers, never longer: the context check at enqueue
        # (jobspec.max_job_tokens) counted on the configured most.
        max_tokens = min(max_tokens, shared.definition["max_tokens"])
    result = _call(p, claim, tier=tier, prompt=work_prompt(claim.kind, claim.payload, feedback=claim.feedback,
                                                           shared=shared),
                   max_tokens=max_tokens, stage=Stage.WORK, call_id=call_id)
    if isinstance(result, Deferred):
        return _defer(p, claim, call_id, status=JobStatus.WORKING, stage=Stage.WORK, tier=tier, deferred=result)
    if isinstance(result, CallFailed):
        _after_call_failed(p, claim, call_id, status=JobStatus.WORKING, stage=Stage.WORK, tier=tier,
                         failed=result)
        return None

    cost = _total_cost(p, tier, result.attempts)
    writes = [*_call_writes(p, call_id=call_id, claim=claim, stage=Stage.WORK, tier=tier, attempts=result.attempts),
              *_stale_cost(job_id, cost)]
    answered = f"{tier} attempt {claim.attempt} answered"
    verdict = quick_verdict(JobKind(claim.kind), claim.payload, result.text, result.stop_reason)
    if verdict is not None:
        # A verdict that needs no model is applied in the statement that records the answer: the
        # job moves from working to its result, with no hop through the validate queue.
        at = utcnow()
        shadow = _shadow_sample(p, claim, at=at) if verdict.ok else None
        return p.record(lambda session: _apply_verdict(
            session, p, claim, call_id, verdict, None, at=at, shadow=shadow,
            answer=Answer(JobStatus.WORKING, writes, cost, answered)))

    def do(session: Connection) -> Handoff | None:
        if _applied_before(session, call_id):
            return Handoff(VALIDATE, job_id, "validate")
        moved = transition(session, job_id, frm=JobStatus.WORKING, version=claim.version,
                           to=JobStatus.VALIDATING, detail=answered,
                           candidate=result.text, candidate_stop=result.stop_reason, add={"cost_usd": cost},
                           also=writes)
        return Handoff(VALIDATE, job_id, "validate") if moved else None

    return p.record(do)


# -- validate ------------------------------------------------------------------------------------


def _quick_verdict(claim: Claim) -> Verdict | None:
    """The verdict that needs no model. The work stage reaches it itself; here only for a job that
    was left in validating by a version that sent every answer through this stage."""
    return quick_verdict(JobKind(claim.kind), claim.payload, claim.candidate, claim.candidate_stop)


def validate(p: Pipeline, job_id: int) -> Handoff | None:
    checker = p.models.format_check_tier
    # The quick verdict decides whether the claim writes a call row; kept, not worked out again
    # (a schema check of the answer is the costliest CPU of the stage).
    quick: dict[str, Verdict | None] = {}

    def format_check(claim: Claim) -> tuple[Stage, str] | None:
        quick["verdict"] = _quick_verdict(claim)
        return None if quick["verdict"] else (Stage.FORMAT_CHECK, checker)

    claimed = _claim(p, job_id, JobStatus.VALIDATING, format_check)
    if claimed is None:
        return None
    claim, call_id = claimed
    assert claim.tier is not None
    verdict = quick["verdict"]
    result: CallResult | None = None
    if verdict is None:
        assert call_id is not None
        answer = claim.candidate or ""
        outcome = _call(p, claim, tier=checker, prompt=format_check_prompt(JobKind(claim.kind), claim.payload, answer,
                                                                          shared=_shared(p, claim, checker)),
                        max_tokens=p.models.limits.format_check_max_tokens, stage=Stage.FORMAT_CHECK,
                        call_id=call_id)
        if isinstance(outcome, Deferred):
            return _defer(p, claim, call_id, status=JobStatus.VALIDATING, stage=Stage.FORMAT_CHECK, tier=checker,
                          deferred=outcome)
        if isinstance(outcome, CallFailed):
            _after_call_failed(p, claim, call_id, status=JobStatus.VALIDATING, stage=Stage.FORMAT_CHECK,
                             tier=checker, failed=outcome)
            return None
        result = outcome
        verdict = parse_format_check(result.text, answer)
        if verdict is None:
            # The checker's answer is no verdict. Check again once (this answer's first check was
            # not itself a check made again); a second answer of the kind fails the draft.
            if p.run(lambda session: last_step(session, job_id)) != (JobStatus.VALIDATING, JobStatus.VALIDATING):
                return p.record(lambda session: _check_again(session, p, claim, call_id, outcome))
            verdict = format_check_unreadable(result.stop_reason)
    # The result's stamp, fixed before its first run: a replay must find the move it made.
    at = utcnow()
    shadow = _shadow_sample(p, claim, at=at) if verdict.ok else None
    return p.record(lambda session: _apply_verdict(session, p, claim, call_id, verdict, result, at=at,
                                                   shadow=shadow))


def _shadow_sample(p: Pipeline, claim: Claim, *, at: datetime) -> dict[str, Any] | None:
    """Draw whether the job, about to succeed, is shadowed (pipeline.flow.shadow): the row to write
    with its success, or None. The draw is made, and the row written, whatever becomes of the
    shadow's calls, so the sample stays random."""
    routing = p.models.routing
    if claim.tier == routing.reference:
        return None  # agreement with itself: never sampled
    shared = _shared(p, claim, claim.tier or "")
    # The batch's rate and the job's difficulty came with the claim: no query of their own.
    rate = effective_rate(configured=routing.shadow_rate, batch=claim.shadow_rate,
                          task=shared.definition.get("shadow_rate") if shared is not None else None)
    if rate <= 0:
        return None
    return sampled_row(claim.id, JobKind(claim.kind), rate=rate, draw=random.random(), routed_tier=claim.tier or "",
                       difficulty=claim.difficulty, reference_tier=routing.reference, judge_tier=routing.judge,
                       now=at)


def _check_again(session: Connection, p: Pipeline, claim: Claim, call_id: int | None,
                 result: CallResult) -> Handoff | None:
    """Record the unreadable format check and move the job from validating to validating: the
    check made again is a stage of its own (a fresh claim, deliveries and deadline), which the
    sweeper recovers like any other, and the move is what tells the next check it is the second."""
    checker = p.models.format_check_tier
    again = Handoff(VALIDATE, claim.id, "validate")
    if _applied_before(session, call_id):
        return again
    cost = _total_cost(p, checker, result.attempts)
    writes: list[Also] = []
    if call_id is not None:
        writes += _call_writes(p, call_id=call_id, claim=claim, stage=Stage.FORMAT_CHECK, tier=checker,
                               attempts=result.attempts)
    writes += _stale_cost(claim.id, cost)
    moved = transition(session, claim.id, frm=JobStatus.VALIDATING, version=claim.version, to=JobStatus.VALIDATING,
                       detail="format check answer unreadable; checking again", add={"cost_usd": cost}, also=writes)
    return again if moved else None


@dataclass(frozen=True)
class Answer:
    """The work answer a verdict is applied with, when the work stage reaches the verdict itself:
    the status the job moves from, the work call's record and cost, and the step's words."""

    frm: JobStatus
    writes: list[Also]
    cost: Decimal
    detail: str


def _apply_verdict(session: Connection, p: Pipeline, claim: Claim, call_id: int | None, verdict: Verdict,
                   result: CallResult | None, *, at: datetime, shadow: dict[str, Any] | None = None,
                   answer: Answer | None = None) -> Handoff | None:
    """Record the verdict and move the job on: from validating (the validate stage, ``result`` its
    format check if one was made), or from working with the ``answer`` recorded in the same
    statement (``call_id`` then the work call's, which tells a replay it has been applied)."""
    tier = claim.tier or ""
    checker = p.models.format_check_tier
    frm = answer.frm if answer is not None else JobStatus.VALIDATING
    cost = _total_cost(p, checker, result.attempts) if result is not None else Decimal(0)
    added: dict[str, Any] = {"cost_usd": cost + (answer.cost if answer is not None else 0)}
    writes: list[Also] = list(answer.writes) if answer is not None else []
    if result is not None and call_id is not None:
        writes += _call_writes(p, call_id=call_id, claim=claim, stage=Stage.FORMAT_CHECK, tier=checker,
                               attempts=result.attempts)
    writes += _stale_cost(claim.id, cost)
    writes.append(Also(_VERDICTS, rows=[{"job_id": claim.id, "tier": tier, "attempt": claim.attempt,
                                   "validator": verdict.validator, "ok": verdict.ok, "problems": verdict.problems,
                                   "created_at": utcnow()}]))
    handoff: Handoff | None = None
    values: dict[str, Any]
    if verdict.ok:
        to, detail, values = JobStatus.SUCCEEDED, f"{verdict.validator} ok", {"output": verdict.output,
                                                                                "feedback": None}
        if shadow is not None:
            # Sampled: the shadow's row goes with the success (only if this move happens), and its
            # step to the reference tier's queue, at the lowest priority.
            writes.append(Also(_SHADOWS, rows=[shadow]))
            handoff = Handoff("shadow", claim.id, shadow["reference_tier"], priority=SHADOW_PRIORITY)
    else:
        step = after_failed_validation(tier, claim.attempt, p.models.routing, retryable=not verdict.final)
        reasons = verdict.feedback
        if step.action == "fail":
            to, detail = JobStatus.FAILED, "validation failed"
            values = {"error": f"validation failed at {tier} after {claim.attempt} attempt(s): {reasons}",
                      "failure_reason": f"validation failed at {tier}"}
        else:
            assert step.tier is not None
            if step.action == "escalate":
                added["escalations"] = 1
            to, detail = JobStatus.WORKING, f"validation failed; {step.action} -> {step.tier}"
            values = {"tier": step.tier, "attempt": step.attempt, "feedback": reasons}
            writes.append(Also(_DECISIONS, rows=[{
                "job_id": claim.id, "reason_kind": "escalation" if step.action == "escalate" else "retry",
                "verdict": None, "confidence": None, "from_tier": tier, "to_tier": step.tier,
                "reason": reasons[:2000], "created_at": utcnow()}]))
            handoff = Handoff(WORK, claim.id, step.tier)
    if _applied_before(session, call_id):
        return handoff
    if call_id is None and replaying(session) and moved_at(session, claim.id, frm=frm, to=to, at=at):
        # A deterministic verdict made no call, so no call row can say that this result was
        # applied; its stamped move does. (Without a call, a result that lost the race to move
        # the job wrote nothing, so running it again in that case is harmless.)
        return handoff
    if answer is not None:
        detail = f"{answer.detail}; {detail}"
    moved = transition(session, claim.id, frm=frm, version=claim.version, to=to, detail=detail,
                       add=added, also=writes, now=at, **values)
    return handoff if moved else None

