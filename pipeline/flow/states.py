"""The job state machine, in one place.

    queued ──► triaging ──► working ──► validating ──► succeeded
       │           │          ▲ │  ▲       │  ▲            ▲
       │           │          └─┤  └───────┤  └──┘ (a)     │
       │           │            └──────────┼───────────────┘ (b)
       └───────────┴───────────────────────┴──► failed | cancelled

    working → working, succeeded or failed: a verdict that needs no model (a label or schema check,
    a refusal, a cut or an empty answer), reached in the statement that records the work answer,
    so the job makes no hop through validate (b; ``working → working`` is its retry or escalation).
    validating → working: a retry or escalation after the format check; (a) validating →
    validating: the format check's answer was unreadable, checked again once.

    triaging | working | validating ──► paused ──► (back where it was) | cancelled
      (a call that does not fit its budget; pipeline.flow.budgets resumes it when there is room)

Every transition is one conditional UPDATE from the status *and version* the caller read, so a
message delivered twice, or a sweeper racing a slow worker, moves a job at most once. Each
successful transition also writes a ``job_events`` row with its timestamp.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import Table, and_, bindparam, case, exists, func, insert, literal, not_, or_, select, union_all, update
from sqlalchemy.sql import ClauseElement

from pipeline.db import Executor, dialect_name
from pipeline.models import TERMINAL, Batch, Job, JobEvent, JobStatus, ModelCall, Tenant, utcnow

Q, T, W, V = JobStatus.QUEUED, JobStatus.TRIAGING, JobStatus.WORKING, JobStatus.VALIDATING
S, F, C = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
P = JobStatus.PAUSED

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    Q: frozenset({T, W, F, C}),
    T: frozenset({W, F, C, P}),
    # working -> succeeded / working (a retry or escalation) / failed: a label, schema or stop
    # verdict, decided in the work stage's own statement (stages.work), with no validate hop.
    W: frozenset({V, S, W, F, C, P}),
    V: frozenset({S, W, V, F, C, P}),
    P: frozenset({T, W, V, C}),
    S: frozenset(),
    F: frozenset(),
    C: frozenset(),
}


class IllegalTransition(ValueError):
    pass


def check(frm: JobStatus, to: JobStatus) -> None:
    if to not in ALLOWED[frm]:
        raise IllegalTransition(f"a job cannot go from {frm.value} to {to.value}")


_JOBS, _EVENTS = cast(Table, Job.__table__), cast(Table, JobEvent.__table__)


def _column(key: str) -> str:
    """An ORM attribute name (``meta``) as the table's column name (``metadata``), for Core."""
    attr = Job.__mapper__.attrs.get(key)
    return attr.columns[0].name if attr is not None else key  # type: ignore[attr-defined,no-any-return]


def _entry_values(to: JobStatus, now: Any) -> dict[str, Any]:
    # A new stage starts unclaimed: no worker holds it until one begins it.
    # ...and has met no transient errors yet (a stage that made progress starts its patience anew).
    values: dict[str, Any] = {"status": to, "version": Job.version + 1, "updated_at": now,
                              "deliveries": 0, "claimed_at": None, "claimed_by": None, "not_before": None,
                              "transient_since": None}
    if to in TERMINAL:
        values.update(finished_at=now, stage_started_at=None, candidate=None)
    else:
        values["stage_started_at"] = now
    return values


def transition(
    session: Executor,
    job_id: int,
    *,
    frm: JobStatus,
    version: int,
    to: JobStatus,
    detail: str | None = None,
    add: Mapping[str, Any] | None = None,
    also: Sequence[Also] = (),
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Move one job if it is still at ``frm``/``version``. True if this call moved it.

    ``values`` are columns to set; ``add`` columns to increase by an amount (``cost_usd``);
    ``also`` the writes that go with the move (``Also``), in the same statement on Postgres.

    ``now`` stamps the move (its event's ``at``); a caller that may replay the move (Pipeline.run
    after a lost connection) passes the same one each time, so the replay can find its own move
    (``moved_at``), not a rival's."""
    check(frm, to)
    add = add or {}
    adds = tuple(sorted(add))
    params: dict[str, Any] = {f"a_{k}": v for k, v in add.items()}
    params.update(b_id=job_id, b_version=version, b_now=now or utcnow(), b_detail=detail)
    if any(isinstance(v, ClauseElement) for v in values.values()):
        # A SQL expression as a value (Job.cost_usd + x): build the statement for this call alone.
        keys: tuple[str, ...] = ()
        expressions: Mapping[str, Any] | None = values
    else:
        keys, expressions = tuple(sorted(values)), None
        params.update({f"v_{k}": v for k, v in values.items()})
    if dialect_name(session) != "postgresql":
        # Data-modifying CTEs are Postgres's: on SQLite (the embedded demo) the same writes go as
        # separate statements in the caller's transaction.
        moved = session.execute(_update_statement(frm, to, keys, adds, expressions=expressions),
                                params).first() is not None
        if moved:
            session.execute(insert(_EVENTS).values(job_id=job_id, from_status=frm, to_status=to,
                                                   at=params["b_now"], detail=detail))
        for a in also:
            a.execute(session, moved=moved)
        return moved
    shapes = tuple(a.shape for a in also)
    for i, a in enumerate(also):
        params.update(a.params(i))
    if expressions is not None:
        stmt = _transition_statement(frm, to, keys, adds, shapes, expressions=expressions)
    else:
        stmt = _cached_transition_statement(frm, to, keys, adds, shapes)
    return session.execute(stmt, params).first() is not None


def moved_at(session: Executor, job_id: int, *, frm: JobStatus, to: JobStatus, at: datetime) -> bool:
    """True if the move of this job from ``frm`` to ``to`` stamped ``at`` (``transition``'s
    ``now``) is committed: a transition replayed after its acknowledgement was lost finds its own."""
    found = select(_EVENTS.c.id).where(_EVENTS.c.job_id == job_id, _EVENTS.c.from_status == frm,
                                       _EVENTS.c.to_status == to, _EVENTS.c.at == at).limit(1)
    return session.execute(found).first() is not None


# What an Also's statement depends on, as a hashable key for the statement cache: the table, the
# columns set and increased, the rows inserted (0 for an update), when it applies, its moved flag.
AlsoShape = tuple[Table, tuple[str, ...], tuple[str, ...], int, str, str | None]


@dataclass(frozen=True)
class Also:
    """A write that goes with a transition and may depend on whether it moved the job: the call
    rows (``applied`` only if the move happened), a routing decision or a verdict (only if it did),
    the cost of calls whose job had moved on (only if it did not).

    On Postgres each joins the transition's statement as one more data-modifying CTE, so a stage
    records its result in one round trip that is atomic on its own: no BEGIN, no COMMIT, and
    nothing half-written if the connection drops. Elsewhere (SQLite) they run after the move, in
    the caller's transaction.

    ``rows`` are inserted, in order (their ids follow it); with ``row_id`` instead, that row is
    updated with ``values`` and ``add``."""

    table: Table
    rows: Sequence[Mapping[str, Any]] = ()
    row_id: int | None = None
    values: Mapping[str, Any] = field(default_factory=dict)
    add: Mapping[str, Any] = field(default_factory=dict)  # columns increased by an amount
    when: Literal["moved", "stale", "always"] = "moved"  # "stale": only if the job had moved on
    moved_flag: str | None = None  # a boolean column written as (its value AND the job moved)

    @property
    def shape(self) -> AlsoShape:
        keys = self.rows[0] if self.rows else self.values
        return (self.table, tuple(sorted(keys)), tuple(sorted(self.add)), len(self.rows), self.when,
                self.moved_flag)

    def params(self, i: int) -> dict[str, Any]:
        if self.row_id is None:
            return {f"x{i}_{r}_{k}": v for r, row in enumerate(self.rows) for k, v in row.items()}
        out = {f"x{i}_{k}": v for k, v in {**self.values, **self.add}.items()}
        out[f"x{i}_id"] = self.row_id
        return out

    def execute(self, session: Executor, *, moved: bool) -> None:
        """The write as a statement of its own, after a transition that ``moved`` the job or not."""
        if (self.when == "moved" and not moved) or (self.when == "stale" and moved):
            return

        def flagged(values: Mapping[str, Any]) -> dict[str, Any]:
            out = dict(values)
            if self.moved_flag:
                out[self.moved_flag] = bool(out[self.moved_flag]) and moved
            return out

        if self.row_id is None:
            session.execute(insert(self.table), [flagged(row) for row in self.rows])
            return
        values = flagged(self.values)
        values.update({k: self.table.c[k] + v for k, v in self.add.items()})
        session.execute(update(self.table).where(self.table.c.id == self.row_id).values(values))


def _also_cte(i: int, shape: AlsoShape, moved: Any) -> Any:
    """One Also as a CTE of the transition's statement; ``moved`` is the UPDATE's CTE."""
    table, keys, adds, rows, when, flag = shape
    did_move = exists(select(moved.c.id))
    cond = {"moved": did_move, "stale": not_(did_move), "always": None}[when]

    def sets(prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in keys:
            param = bindparam(f"{prefix}_{k}", type_=table.c[k].type)
            out[k] = and_(param, did_move) if k == flag else param
        return out

    if not rows:
        # An update of the job's own row (the "stale" cost) sits beside the transition's UPDATE of
        # that row. Postgres leaves undefined which of two writes to one row in a statement wins,
        # but here at most one writes: the EXISTS makes them exclusive.
        values = sets(f"x{i}")
        values.update({k: table.c[k] + bindparam(f"x{i}_{k}", type_=table.c[k].type) for k in adds})
        stmt = update(table).where(table.c.id == bindparam(f"x{i}_id")).values(values)
        return (stmt if cond is None else stmt.where(cond)).cte(f"also{i}")
    # INSERT ... SELECT :values [WHERE [NOT] EXISTS (moved)] for each row, in order: a UNION ALL
    # appends its branches in the order given, so the rows' ids follow the list.
    selects = [select(*sets(f"x{i}_{r}").values()) for r in range(rows)]
    if cond is not None:
        selects = [sel.where(cond) for sel in selects]
    source = selects[0] if rows == 1 else union_all(*selects)
    return insert(table).from_select(list(keys), source).cte(f"also{i}")


def _transition_statement(frm: JobStatus, to: JobStatus, keys: tuple[str, ...], adds: tuple[str, ...],
                          shapes: tuple[AlsoShape, ...] = (), *,
                          expressions: Mapping[str, Any] | None = None) -> Any:
    """One statement: the conditional UPDATE, the job_events row inserted from what it RETURNs
    (so the event exists exactly when the job moved), and the writes that go with it (``Also``).

    Why not ORM update() then session.add(JobEvent): this runs on every hop of every job, and
    building statements cost more CPU than Postgres spent running them (bench/). So: one round
    trip, Core on the tables, and for the usual call shapes a statement built once and executed
    with bound parameters (``_cached_transition_statement``)."""
    now = bindparam("b_now", type_=_EVENTS.c.at.type)
    moved = _update_statement(frm, to, keys, adds, expressions=expressions).cte("moved")
    stmt = insert(_EVENTS).from_select(
        ["job_id", "from_status", "to_status", "at", "detail"],
        select(moved.c.id, literal(frm, _EVENTS.c.from_status.type), literal(to, _EVENTS.c.to_status.type), now,
               bindparam("b_detail", type_=_EVENTS.c.detail.type)),
    ).returning(_EVENTS.c.job_id)
    if shapes:
        stmt = stmt.add_cte(*(_also_cte(i, shape, moved) for i, shape in enumerate(shapes)))
    return stmt


def _update_statement(frm: JobStatus, to: JobStatus, keys: tuple[str, ...], adds: tuple[str, ...], *,
                      expressions: Mapping[str, Any] | None = None) -> Any:
    """The conditional UPDATE of a transition, RETURNING the id when it moved the job."""
    now = bindparam("b_now", type_=_EVENTS.c.at.type)
    sets = {**_entry_values(to, now), **{k: bindparam(f"v_{k}") for k in keys}, **(expressions or {})}
    sets.update({k: getattr(Job, k) + bindparam(f"a_{k}") for k in adds})
    return (
        update(_JOBS)
        .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.status == frm, _JOBS.c.version == bindparam("b_version"))
        .values({_column(k): v for k, v in sets.items()})
        .returning(_JOBS.c.id)
    )


@functools.lru_cache(maxsize=256)
def _cached_transition_statement(frm: JobStatus, to: JobStatus, keys: tuple[str, ...],
                                 adds: tuple[str, ...], shapes: tuple[AlsoShape, ...]) -> Any:
    return _transition_statement(frm, to, keys, adds, shapes)


@dataclass(frozen=True)
class Moved:
    id: int
    tier: str | None


def transition_many(
    session: Executor,
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
    # When this stage began meeting nothing but transient errors, if it has (its patience's start).
    transient_since: datetime | None = None
    # The task version the job is bound to, if any: its prompts share the task's part.
    task_id: int | None = None
    # The job's batch: its mode (standard or economy, pipeline.flow.economy) is the batch's.
    batch_id: int | None = None
    # True if a budget covers the job (its batch's, or its tenant's daily limit): only then does a
    # call reserve its worst case first (pipeline.flow.budgets.hold_call).
    budgeted: bool = False
    # What a success's shadow draw needs (stages._shadow_sample): the triaged difficulty and the
    # batch's own shadow rate.
    difficulty: str | None = None
    shadow_rate: float | None = None


# Built once, run with bound parameters, on the table rather than the ORM entity: every stage of
# every job begins here, and building the statement each time cost more CPU than running it.
_NOW = bindparam("b_now", type_=_JOBS.c.claimed_at.type)
_BATCHES, _TENANTS = cast(Table, Batch.__table__), cast(Table, Tenant.__table__)
_CALLS = cast(Table, ModelCall.__table__)
# Read with the claim, in its one round trip, rather than by a query of their own later in the
# stage: whether a budget covers the job (a reservation needs a transaction of three round trips,
# which most jobs, under no budget, can skip), and the batch's shadow rate. The claim reads them a
# few milliseconds before the call, as the separate queries did: a budget set in between covers
# the job's next call, as one set while the call is in flight always did.
_BUDGETED = (select(or_(_BATCHES.c.budget_usd.is_not(None), _TENANTS.c.max_spend_per_day_usd.is_not(None)))
             .select_from(_BATCHES.outerjoin(_TENANTS, _TENANTS.c.id == _BATCHES.c.tenant_id))
             .where(_BATCHES.c.id == _JOBS.c.batch_id).scalar_subquery())
_SHADOW_RATE = select(_BATCHES.c.shadow_rate).where(_BATCHES.c.id == _JOBS.c.batch_id).scalar_subquery()
_EXTRAS = (func.coalesce(_BUDGETED, False), _JOBS.c.difficulty, _SHADOW_RATE)
_CLAIM = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.status == bindparam("b_status"),
           or_(_JOBS.c.claimed_at.is_(None), _JOBS.c.claimed_at < bindparam("b_stale"), _JOBS.c.claimed_at == _NOW),
           # A stage waiting out transient errors runs only once the dispatcher publishes it again:
           # a stray message (a redelivery, an old republish) must not cut its wait short.
           _JOBS.c.not_before.is_(None))
    # A claim already stamped with this very time is this claim, committed once and now replayed
    # (its acknowledgement was lost with the connection): taken again, and not counted twice.
    .values(deliveries=case((_JOBS.c.claimed_at == _NOW, _JOBS.c.deliveries), else_=_JOBS.c.deliveries + 1),
            claimed_at=_NOW, claimed_by=bindparam("b_worker", type_=_JOBS.c.claimed_by.type))
    .returning(_JOBS.c.id, _JOBS.c.version, _JOBS.c.deliveries, _JOBS.c.kind, _JOBS.c.payload, _JOBS.c.tier,
               _JOBS.c.attempt, _JOBS.c.feedback, _JOBS.c.candidate, _JOBS.c.candidate_stop, _JOBS.c.transient_since,
               _JOBS.c.task_id, _JOBS.c.batch_id)
)
_BEGIN_STAGE = _CLAIM.returning(*_EXTRAS)
# SQLite's RETURNING names its columns without their table, the subqueries' too, which makes them
# ambiguous: there the claim reads them with a SELECT after it.
_READ_EXTRAS = select(*_EXTRAS).where(_JOBS.c.id == bindparam("b_id"))


def begin_stage(session: Executor, job_id: int, *, status: JobStatus, claim_deadline_s: float,
                now: datetime | None = None, worker: str | None = None) -> Claim | None:
    """Claim the job for the stage that is starting, if it is in that stage and no live worker
    holds it.

    Returns None for a stale message (the job has moved on) and for a duplicate one (another worker
    claimed the stage less than ``claim_deadline_s`` ago and is still on it). Refusing duplicates
    here matters twice over: the sweeper and Redis's visibility timeout both republish, and without
    this guard two workers would pay for the same call at once, and each duplicate would count as a
    delivery, failing a healthy job as poison. The delivery count is raised only by real claims,
    so it counts the workers that began this stage and died (or stalled) on it.

    ``now`` stamps the claim; a caller that may replay the claim (Pipeline.run after a lost
    connection) passes the same one each time, so the replay finds its own claim, not a rival's.
    ``worker`` names the process that holds it (its heartbeat's identity), so that the sweeper can
    tell a dead worker's claim from a live one's without waiting out the deadline."""
    now = now or utcnow()
    params = {"b_id": job_id, "b_status": status, "b_now": now, "b_worker": worker,
              "b_stale": now - timedelta(seconds=claim_deadline_s)}
    if dialect_name(session) == "postgresql":
        row = session.execute(_BEGIN_STAGE, params).first()
        return Claim(*row) if row is not None else None
    row = session.execute(_CLAIM, params).first()
    if row is None:
        return None
    # The RETURNING's columns, then the extras: in the order Claim lists them.
    return Claim(*(*row, *session.execute(_READ_EXTRAS, {"b_id": job_id}).one()))


@functools.cache
def _begin_stage_with_call(stage: Any, tier: str | None, models: tuple[tuple[str, str], ...]) -> Any:
    """The claim and its call's started row in one statement (Postgres: a data-modifying WITH).
    ``tier`` None: the call goes to the job's own tier, and ``models`` maps each tier to its model.
    Built once for each stage and configuration: building it cost more CPU than running it."""
    calls = _CALLS
    claimed = _BEGIN_STAGE.cte("claimed")
    model_of = dict(models)
    tier_col: Any = claimed.c.tier if tier is None else literal(tier, calls.c.tier.type)
    model_col: Any = (case(model_of, value=claimed.c.tier) if tier is None
                      else literal(model_of[tier], calls.c.model.type))
    # The columns' Python-side defaults are written out: as a WITH's INSERT from a SELECT, they
    # would be left NULL.
    zeros = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd")
    started = (insert(calls)
               .from_select(["job_id", "stage", "tier", "model", "attempt", "outcome", "delivery", "started_at",
                             "applied", *zeros],
                            select(claimed.c.id, literal(stage, calls.c.stage.type), tier_col, model_col, literal(1),
                                   literal("started"), claimed.c.deliveries, _NOW, literal(False),
                                   *(literal(0) for _ in zeros))
                            # A poison job (past its deliveries) makes no call: its claim fails it.
                            .where(claimed.c.deliveries <= bindparam("b_max_deliveries")), include_defaults=False)
               .returning(calls.c.id).cte("started"))
    return select(*claimed.c, select(started.c.id).scalar_subquery())


def begin_stage_with_call(session: Executor, job_id: int, *, status: JobStatus, claim_deadline_s: float,
                          now: datetime, worker: str | None, stage: Any, tier: str | None,
                          models: Mapping[str, str], max_deliveries: int) -> tuple[Claim, int | None] | None:
    """``begin_stage``, writing in the same statement the started row of the call the stage is
    about to make (stamped ``now``), unless the claim finds the job past ``max_deliveries``: one
    round trip where two ran one after the other. Postgres only (SQLite has no INSERT in a WITH);
    ``stages._claim`` runs the two statements there."""
    stmt = _begin_stage_with_call(stage, tier, tuple(sorted(models.items())))
    row = session.execute(stmt, {"b_id": job_id, "b_status": status, "b_now": now, "b_worker": worker,
                                 "b_stale": now - timedelta(seconds=claim_deadline_s),
                                 "b_max_deliveries": max_deliveries}).first()
    if row is None:
        return None
    return Claim(*row[:-1]), row[-1]


def release_stage(session: Executor, job_id: int, *, status: JobStatus, version: int,
                  not_before: datetime | None = None, transient_since: datetime | None = None,
                  parked: bool = False) -> bool:
    """Undo ``begin_stage`` for a stage that handed its job back (a rate-limit wait, or a call whose
    attempts all met transient errors): the delivery did not die, so it must not count towards the
    poison-job bound, and the sweeper's clock restarts. True if the job was still where the stage
    left it.

    ``not_before``: the stage waits in Postgres until then, with no message anywhere, and the
    dispatcher publishes it again when it is due (pipeline.flow.dispatch.refeed). ``transient_since``:
    when the stage began meeting transient errors, kept if an earlier round already set it.
    ``parked``: the wait is for an economy call's message batch (admission.in_flight)."""
    values: dict[str, Any] = {"deliveries": Job.deliveries - 1, "stage_started_at": utcnow(),
                              # ...and gives up its claim, or the next message would find the stage held.
                              "claimed_at": None, "claimed_by": None, "not_before": not_before,
                              "parked": parked}
    if transient_since is not None:
        values["transient_since"] = func.coalesce(Job.transient_since, transient_since)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == status, Job.version == version, Job.deliveries > 0)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def renew_claim(session: Executor, job_id: int, *, version: int) -> bool:
    """Show the sweeper that the worker holding this stage is alive (it is starting another attempt
    of its call), so the claim deadline need only cover one attempt, not all of them."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.version == version, Job.claimed_at.is_not(None))
        .values(claimed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def last_step(session: Executor, job_id: int) -> tuple[JobStatus | None, JobStatus] | None:
    """The job's latest transition, (from, to): the move that brought it to its current status."""
    row = session.execute(select(JobEvent.from_status, JobEvent.to_status).where(JobEvent.job_id == job_id)
                          .order_by(JobEvent.id.desc()).limit(1)).first()
    return (row.from_status, row.to_status) if row is not None else None

