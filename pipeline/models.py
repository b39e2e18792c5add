"""The schema. Postgres is the source of truth: every job, transition, routing decision, model
call and validation verdict is a row here. The migrations in ``migrations/`` build it; a test
checks that they agree with these models."""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.db import Base

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
Money = Numeric(14, 8)


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    TRIAGING = "triaging"
    WORKING = "working"
    VALIDATING = "validating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Waiting for room in a budget (pipeline.flow.budgets): no call made, no worker holding it, not
    # failed. Neither active (the dispatcher's room and the sweeper ignore it) nor terminal.
    PAUSED = "paused"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = (JobStatus.TRIAGING, JobStatus.WORKING, JobStatus.VALIDATING)


class JobKind(enum.StrEnum):
    CLASSIFY = "classify"
    EXTRACT = "extract"
    DRAFT = "draft"
    GENERATE = "generate"


class Stage(enum.StrEnum):
    TRIAGE = "triage"
    WORK = "work"
    FORMAT_CHECK = "format_check"
    # Shadow evaluation's calls (pipeline.flow.shadow): the reference tier's answer and the judge's
    # verdict. Evaluation cost, never added to the job's cost nor counted by stats.
    SHADOW = "shadow"
    JUDGE = "judge"


EVALUATION_STAGES = (Stage.SHADOW, Stage.JUDGE)


class ShadowStatus(enum.StrEnum):
    PENDING = "pending"    # sampled, its reference call not made yet
    WORKING = "working"    # a worker is making the reference call
    JUDGING = "judging"    # the reference answered; a draft or generation waits for the judge
    DONE = "done"          # agreement recorded
    FAILED = "failed"      # a call failed for good: no agreement, kept out of the estimates


OPEN_SHADOW = (ShadowStatus.PENDING, ShadowStatus.WORKING, ShadowStatus.JUDGING)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored by value as a plain string with a CHECK, so adding a value is a small migration and
    # the column reads the same from psql as from Python.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=20,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


UNROLLED_JOBS = "NOT rolled_up AND status IN ('succeeded', 'failed', 'cancelled')"


class Tenant(Base):
    """A team using the HTTP API. Its limits are NULL when it has none."""

    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("weight > 0", name="weight_positive"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # Jobs accepted and not yet finished (queued or in a stage). Queued jobs count: they are a
    # backlog the tenant holds in Postgres, whatever share of the stages the round robin gives it.
    max_jobs_in_flight: Mapped[int | None] = mapped_column(Integer)
    max_spend_per_day_usd: Mapped[Decimal | None] = mapped_column(Money)
    # The tenant's share of the dispatcher's round robin against the other tenants with queued jobs
    # at the same priority (pipeline.flow.admission): weight 2 gets twice the jobs in flight of weight 1.
    weight: Mapped[float] = mapped_column(default=1.0, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


class ApiToken(Base):
    """A bearer token, kept only as the SHA-256 of its secret part. The public prefix is the
    lookup key, so checking a token is one index hit and one constant-time compare."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(20), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # An operator's token reads every tenant's jobs and batches (API reads, the dashboard).
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        # Names are unique per tenant. Batches enqueued from the CLI have no tenant (the operator's
        # own); NULLs are distinct in a unique constraint, so a partial index keeps those unique.
        UniqueConstraint("tenant_id", "name"),
        Index("uq_batches_name_no_tenant", "name", unique=True,
              postgresql_where=text("tenant_id IS NULL"), sqlite_where=text("tenant_id IS NULL")),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority_range"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The share of this batch's jobs shadowed (enqueue --shadow-rate), over the task's and the
    # configuration's; NULL: not set for the batch.
    shadow_rate: Mapped[float | None]
    # 0-9: the dispatcher admits a higher priority's queued jobs first, and its messages carry it
    # (pipeline.flow.admission). Set at enqueue (--priority), else by the task, else 5.
    priority: Mapped[int] = mapped_column(SmallInteger, default=5, server_default="5")
    # How the batch's model calls are made: "standard" (synchronous /v1/messages) or "economy"
    # (Message Batches, at the batch discount: pipeline.flow.economy). NULL: not set for the batch,
    # so the task's default mode, else standard.
    mode: Mapped[str | None] = mapped_column(String(20))
    # The batch's spending cap in USD (enqueue --budget-usd, `batches budget`); NULL: none. Its
    # calls reserve their worst case against it before they are made (pipeline.flow.budgets).
    budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    # What the batch's budgeted calls have cost, added in the statement that records each call.
    budget_spent_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")


class TenantSpendDay(Base):
    """A tenant's spend on one UTC day, against its daily limit (tenants.max_spend_per_day_usd) at
    call time: the row its calls' reservations lock and its calls' costs are added to."""

    __tablename__ = "tenant_spend_days"
    __table_args__ = (UniqueConstraint("tenant_id", "day"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    spent_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")


class BudgetReservation(Base):
    """The worst-case cost of one model call, held against the budgets that cover it (its batch's,
    its tenant's day) from before the call until its result is recorded. Open while ``released_at``
    is NULL: what a budget has reserved is the sum of its open rows, so releasing is setting that
    column once, and a release that comes twice (the sweeper and a late result) changes nothing."""

    __tablename__ = "budget_reservations"
    __table_args__ = (
        Index("ix_budget_reservations_open_batch", "batch_id", postgresql_where=text("released_at IS NULL"),
              sqlite_where=text("released_at IS NULL")),
        Index("ix_budget_reservations_open_day", "day_id", postgresql_where=text("released_at IS NULL"),
              sqlite_where=text("released_at IS NULL")),
        Index("ix_budget_reservations_open_request", "economy_request_id",
              postgresql_where=text("released_at IS NULL AND economy_request_id IS NOT NULL"),
              sqlite_where=text("released_at IS NULL AND economy_request_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Deleting the call row (a call handed back before any attempt) deletes, so releases, its hold.
    # NULL while an economy call's hold waits with its request in a message batch (economy_request_id).
    call_id: Mapped[int | None] = mapped_column(ForeignKey("model_calls.id", ondelete="CASCADE"), unique=True)
    economy_request_id: Mapped[int | None] = mapped_column(ForeignKey("economy_requests.id", ondelete="SET NULL"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    day_id: Mapped[int | None] = mapped_column(ForeignKey("tenant_spend_days.id", ondelete="CASCADE"))
    amount_usd: Mapped[Decimal] = mapped_column(Money)
    # The call's actual cost, once its result is recorded; NULL if it never was (released by the sweeper).
    cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Task(Base):
    """One version of a named task: what a batch of jobs shares (instructions, label definitions,
    examples, a schema), so that it is written once and sent as the shared head of every prompt.
    A version is never changed: applying a changed definition adds the next version
    (pipeline.intake.tasks). Tasks are per tenant; the operator's own (from the CLI) have no tenant."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version"),
        # NULLs are distinct in a unique constraint: as for batches, a partial index keeps the
        # operator's versions unique.
        Index("uq_tasks_name_version_no_tenant", "name", "version", unique=True,
              postgresql_where=text("tenant_id IS NULL"), sqlite_where=text("tenant_id IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "kind"))
    # SHA-256 of the canonical definition: applying the same content again adds no version.
    content_sha256: Mapped[str] = mapped_column(String(64))
    definition: Mapped[dict[str, Any]] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The idempotency key (ON CONFLICT (batch_id, key) infers it). varchar_pattern_ops also lets
        # `jobs list --key-prefix` (LIKE 'p%') range-scan it whatever the database collation.
        Index("uq_jobs_batch_id_key", "batch_id", "key", unique=True,
              postgresql_ops={"key": "varchar_pattern_ops"}),
        # The sweeper scans each active status for stale stages through this index, never the
        # whole table.
        Index("ix_jobs_status_stage_started_at", "status", "stage_started_at"),
        # History queries (pipeline/queries/history.py says which query reads which index, and why).
        Index("ix_jobs_batch_id_id", "batch_id", "id"),
        Index("ix_jobs_batch_id_status_id", "batch_id", "status", "id", postgresql_include=["tier", "escalations"]),
        Index("ix_jobs_status_id", "status", "id"),
        # The dispatcher's admission (pipeline.flow.admission): which batches have queued jobs, and
        # each one's oldest. Partial: a job is in it only while queued.
        Index("ix_jobs_queued_batch_id", "batch_id", "id", postgresql_where=text("status = 'queued'"),
              sqlite_where=text("status = 'queued'")),
        Index("ix_jobs_created_at", "created_at", postgresql_using="brin"),
        # Jobs of a tier in a time window. Partial: a job enters it only once triage gives it a
        # tier, so enqueueing and the first transitions do not pay for it.
        Index("ix_jobs_tier_created_at", "tier", "created_at", postgresql_where=text("tier IS NOT NULL"),
              sqlite_where=text("tier IS NOT NULL")),
        # The dispatcher's refeed finds the stages whose wait after transient errors is over. Partial:
        # only waiting jobs are in it, so no other transition pays for it.
        Index("ix_jobs_not_before", "not_before", postgresql_where=text("not_before IS NOT NULL"),
              sqlite_where=text("not_before IS NOT NULL")),
        # The finished jobs not yet folded into the rollups (pipeline.queries.rollups). Partial: a
        # job enters it when it ends and leaves it when folded, a few seconds later.
        Index("ix_jobs_unrolled", "id", postgresql_where=text(UNROLLED_JOBS), sqlite_where=text(UNROLLED_JOBS)),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "kind"))
    payload: Mapped[dict[str, Any]] = mapped_column(Json)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", Json)
    pinned_tier: Mapped[str | None] = mapped_column(String(40))
    # The task version the job named, bound at enqueue and kept for life (a new version of the task
    # does not change what this job was asked); NULL for a job without a task.
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="RESTRICT"))

    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "status"), default=JobStatus.QUEUED)
    # Bumped by every transition; a stage applies its result only if the version it read is still
    # current, so a message delivered twice cannot move a job twice.
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    stage_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # How many times the current stage was begun. A worker that dies mid-stage leaves this
    # raised; past the limit the job is a poison job and fails instead of looping.
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When a worker last showed it is alive on the current stage (claimed it, or began another
    # attempt of its call); NULL while no worker holds the stage. A stale claim means the worker
    # died, and is swept after the short claim deadline; a job merely waiting in the broker's
    # queue has no claim and is swept only after the long stage deadline (pipeline.flow.dispatch).
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The worker process holding the claim, as its heartbeat names it (pipeline.queries.ops.Heartbeat:
    # unique per process start); NULL for a worker without a heartbeat. The sweeper republishes the
    # claims of a worker whose heartbeat has lapsed at once, without waiting out the claim deadline.
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    # A stage whose call met only transient errors (429, 529, 5xx, timeouts) until its attempts ran
    # out waits here, with no claim and no message anywhere, until this time; the dispatcher then
    # publishes it again (pipeline.flow.dispatch.refeed). NULL for every job that is not waiting.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set with not_before when the wait is for an economy call's message batch (pipeline.flow.economy),
    # which can take hours: such a job holds no message, no thread and no broker place, so it is not
    # counted in flight (in_flight below) until its answer wakes it (not_before = now).
    parked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # When the current stage began meeting nothing but transient errors (the first failed attempt
    # of its first round that ran out); the patience counts from here. Cleared by every transition.
    transient_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    difficulty: Mapped[str | None] = mapped_column(String(20))
    tier: Mapped[str | None] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    escalations: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The latest work answer awaiting validation, and how the model stopped writing it.
    candidate: Mapped[str | None] = mapped_column(Text)
    candidate_stop: Mapped[str | None] = mapped_column(String(40))
    feedback: Mapped[str | None] = mapped_column(Text)

    output: Mapped[Any | None] = mapped_column(Json)
    error: Mapped[str | None] = mapped_column(Text)
    # A failed job's reason in a few words, the same for every job that failed the same way ("work
    # call to sonnet: 400 invalid_request_error", "validation failed at opus"), so that summaries
    # can count the most common ones; ``error`` has the whole story of this job.
    failure_reason: Mapped[str | None] = mapped_column(String(200))
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Folded into the rollups (set by the fold, once the job has ended; pipeline.queries.rollups).
    rolled_up: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # What economy mode had to do out of the ordinary for this job (a request that expired twice
    # went the standard path), for `jobs show`; NULL for most jobs.
    economy_note: Mapped[str | None] = mapped_column(Text)
    # A paused job (pipeline.flow.budgets): why ("budget"), the status it resumes to, and the
    # worst-case cost that did not fit, so the dispatcher resumes it once that much is free.
    paused_reason: Mapped[str | None] = mapped_column(String(20))
    paused_from: Mapped[str | None] = mapped_column(String(20))
    paused_need_usd: Mapped[Decimal | None] = mapped_column(Money)


class JobEvent(Base):
    """One row per transition: the job's timeline."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[JobStatus | None] = mapped_column(_enum(JobStatus, "from_status"))
    to_status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "to_status"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text)


class RoutingDecision(Base):
    """Why a job went to a tier: a triage verdict, a pin, a retry or an escalation."""

    __tablename__ = "routing_decisions"
    __table_args__ = (
        # report.summarize counts a batch's escalations per tier without reading every job's
        # triage decision.
        Index("ix_routing_decisions_escalation_job_id", "job_id", postgresql_where=text("reason_kind = 'escalation'"),
              sqlite_where=text("reason_kind = 'escalation'")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    reason_kind: Mapped[str] = mapped_column(String(20))  # triage | pinned | retry | escalation
    verdict: Mapped[str | None] = mapped_column(String(20))  # easy | medium | hard | ambiguous
    # The difficulty triage named, before the confidence threshold made a low-confidence one
    # "ambiguous" (verdict); NULL when it named none it could parse, and on rows before the column.
    triaged_as: Mapped[str | None] = mapped_column(String(20))
    confidence: Mapped[float | None]
    reason: Mapped[str | None] = mapped_column(Text)
    from_tier: Mapped[str | None] = mapped_column(String(40))
    to_tier: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelCall(Base):
    """Every HTTP call to Claude, successful or not, with its tokens and cost."""

    __tablename__ = "model_calls"
    __table_args__ = (
        # report.summarize's "last successful work call of each job" reads only work calls. The
        # stage never changes after the insert, so the call's later update can still be HOT.
        Index("ix_model_calls_work_job_id", "job_id", postgresql_where=text("stage = 'work'"),
              sqlite_where=text("stage = 'work'")),
        # The calls not yet folded into the rollups: the ones in flight and those finished since the
        # last fold, and abandoned ones (pipeline.queries.rollups says why those stay). Its
        # predicate's column is written only by the fold, so a worker's update of its call row can
        # still be HOT.
        Index("ix_model_calls_unrolled", "job_id", postgresql_where=text("NOT rolled_up"),
              sqlite_where=text("NOT rolled_up")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[Stage] = mapped_column(_enum(Stage, "stage"))
    tier: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(100))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # Which delivery of the stage made the call: above 1, the stage was begun again (a worker died
    # or a message was repeated), and the call is a repeat.
    delivery: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # started -> ok | error; a call whose worker died stays "started" until the sweeper marks it
    # "abandoned", so calls repeated after a crash are still counted.
    outcome: Mapped[str] = mapped_column(String(20), default="started")
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_creation_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    latency_ms: Mapped[float | None]
    request_id: Mapped[str | None] = mapped_column(String(100))
    status_code: Mapped[int | None]
    stop_reason: Mapped[str | None] = mapped_column(String(40))
    error_type: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    response_text: Mapped[str | None] = mapped_column(Text)
    # False when the stage that made this call lost the race to apply its result (a duplicate
    # delivery): the call cost money but did not move the job.
    applied: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Folded into the rollups (set by the fold only; pipeline.queries.rollups).
    rolled_up: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # The message batch that answered it (economy mode: msgbatch_...); NULL for a synchronous call.
    message_batch_id: Mapped[str | None] = mapped_column(String(100))


class ValidationVerdict(Base):
    __tablename__ = "validation_verdicts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tier: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer)
    validator: Mapped[str] = mapped_column(String(40))  # label | json_schema | format_check | answer
    ok: Mapped[bool] = mapped_column(Boolean)
    problems: Mapped[list[str]] = mapped_column(Json, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CacheWarmup(Base):
    """A prompt prefix that the model caches (everything up to a cache_control breakpoint), and
    whether it is warm: written by an answered call, so the calls after it read it. One call at a
    time writes it, across every worker and process, holding the lease (pipeline.flow.warmup)."""

    __tablename__ = "cache_warmups"

    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    # SHA-256 of the bytes up to the breakpoint and the entry's TTL (warmup.prefix_key).
    prefix_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Until when the cache holds it, as far as switchyard knows: the last answered call that
    # read or wrote it, plus the tier's TTL. NULL: never answered yet.
    warm_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The call warming it: its token, when it took the lease, and when the lease lapses (a dead or
    # slow warmer then gives way to the next caller). NULL when nobody holds it.
    lease_token: Mapped[str | None] = mapped_column(String(32))
    leased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ShadowEvaluation(Base):
    """A job sampled for shadow evaluation: written when the job succeeds, with the random draw
    and the rate it was drawn against, before any shadow call is made, so the sample is on record
    whatever becomes of the calls. Its status moves by conditional updates (pipeline.flow.shadow).
    Jobs that succeeded at the reference tier are never sampled: their agreement is 1 by definition."""

    __tablename__ = "shadow_evaluations"
    __table_args__ = (
        # The dispatcher's shadow sweep reads only the open ones.
        Index("ix_shadow_evaluations_open", "updated_at",
              postgresql_where=text("status IN ('pending', 'working', 'judging')"),
              sqlite_where=text("status IN ('pending', 'working', 'judging')")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    status: Mapped[ShadowStatus] = mapped_column(_enum(ShadowStatus, "status"), default=ShadowStatus.PENDING)
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The sample: the job was taken because draw < rate.
    rate: Mapped[float]
    draw: Mapped[float]
    # The stratum: where the job ended and what triage said (NULL for a pinned job).
    routed_tier: Mapped[str] = mapped_column(String(40))
    difficulty: Mapped[str | None] = mapped_column(String(20))
    reference_tier: Mapped[str] = mapped_column(String(40))
    judge_tier: Mapped[str | None] = mapped_column(String(40))
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A step that met only transient errors waits until then; the dispatcher publishes it again.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reference_answer: Mapped[str | None] = mapped_column(Text)
    # 1 when the answers agree; for extract, the share of fields equal. ``agreed``: all of it.
    agreement: Mapped[float | None]
    agreed: Mapped[bool | None] = mapped_column(Boolean)
    fields_total: Mapped[int | None] = mapped_column(Integer)
    fields_equal: Mapped[int | None] = mapped_column(Integer)
    judge_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    # What its calls cost: evaluation cost, never part of the job's.
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# -- rollups (pipeline.queries.rollups) ------------------------------------------------------------

# Latency histogram: bucket 0 holds calls under 1 ms; bucket k (1..LATENCY_BUCKETS-2) holds
# [2^((k-1)/4), 2^(k/4)) ms, four buckets per doubling; the last holds everything from
# 2^((LATENCY_BUCKETS-2)/4) ms (about 14.6 minutes) up.
LATENCY_BUCKETS = 81
LatencyHistogram = ARRAY(BigInteger).with_variant(JSON(), "sqlite")


class _RollupFigures:
    """What a rollup row adds up, for one batch and tier (and minute, in ``RollupMinute``).

    Job figures count the jobs that ended (at their final tier, "-" for a job that never had one),
    with what was decided about them: escalations away from a tier, verdicts on a tier's answers,
    the jobs a tier worked, and the tokens of each job's last successful work call (priced at the
    top tier by ``stats``). Call figures count the calls that finished (ok or error)."""

    jobs_succeeded: Mapped[int] = mapped_column(BigInteger, server_default="0")
    jobs_failed: Mapped[int] = mapped_column(BigInteger, server_default="0")
    jobs_cancelled: Mapped[int] = mapped_column(BigInteger, server_default="0")
    job_escalations: Mapped[int] = mapped_column(BigInteger, server_default="0")  # sum of jobs.escalations
    escalations: Mapped[int] = mapped_column(BigInteger, server_default="0")  # escalation decisions from the tier
    worked: Mapped[int] = mapped_column(BigInteger, server_default="0")
    validations: Mapped[int] = mapped_column(BigInteger, server_default="0")
    validations_failed: Mapped[int] = mapped_column(BigInteger, server_default="0")
    top_input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    top_output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    top_cache_creation_input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    top_cache_read_input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    failed_calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    repeated_calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cache_creation_input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cache_read_input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(18, 8), server_default="0")
    repeated_cost_usd: Mapped[Decimal] = mapped_column(Numeric(18, 8), server_default="0")
    # Calls per latency bucket (LATENCY_BUCKETS); NULL until a call with a latency is folded.
    latency_histogram: Mapped[list[int] | None] = mapped_column(LatencyHistogram)


class RollupTotal(_RollupFigures, Base):
    """A batch's figures per tier, over its whole life: what `stats` and `batches` read."""

    __tablename__ = "rollup_totals"

    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    tier: Mapped[str] = mapped_column(String(40), primary_key=True)


class RollupMinute(_RollupFigures, Base):
    """A batch's figures per tier and minute (a job by the minute it ended, a call by the minute it
    finished): what the dashboard's charts read."""

    __tablename__ = "rollup_minutes"
    __table_args__ = (Index("ix_rollup_minutes_minute", "minute"),)

    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    tier: Mapped[str] = mapped_column(String(40), primary_key=True)
    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)


class RollupFailure(Base):
    """How many of a batch's folded jobs failed for each reason (report.failure_reasons)."""

    __tablename__ = "rollup_failures"

    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    # md5 of the reason: a job's error can be longer than an index entry may be.
    reason_md5: Mapped[str] = mapped_column(String(32), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    jobs: Mapped[int] = mapped_column(BigInteger, server_default="0")
class MessageBatch(Base):
    """One message batch of economy mode (pipeline.flow.economy), written before it is created at
    the API ("creating", no ``api_id`` yet) and again once it is ("in_progress", its id): a
    dispatcher killed between the two leaves a "creating" row that the next one reconciles with the
    API's list of batches instead of submitting its requests again."""

    __tablename__ = "message_batches"
    __table_args__ = (
        Index("ix_message_batches_open", "state", postgresql_where=text("state IN ('creating', 'in_progress')"),
              sqlite_where=text("state IN ('creating', 'in_progress')")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    api_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    model: Mapped[str] = mapped_column(String(100))
    # creating -> in_progress -> ended; creating -> failed (never created: its requests went back)
    state: Mapped[str] = mapped_column(String(20), default="creating")
    requests: Mapped[int] = mapped_column(Integer)
    # The API's request_counts at the last poll.
    counts: Mapped[dict[str, Any] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    polled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class EconomyRequest(Base):
    """One model call of an economy job, made through a message batch: the exact /v1/messages
    body the synchronous path would send, then its result. A stage that needs the call writes it
    ("pending") and hands its job back; the dispatcher submits it, stores the result ("done") and
    wakes the job; the stage, run again, applies the result as a synchronous answer and marks it
    ``consumed_at`` in the same statement. Keyed by the job's version: a stage makes one call per
    version, and the version moves on with every transition."""

    __tablename__ = "economy_requests"
    __table_args__ = (
        Index("ix_economy_requests_job", "job_id", "job_version", "purpose"),
        Index("ix_economy_requests_pending", "model", "id", postgresql_where=text("state = 'pending'"),
              sqlite_where=text("state = 'pending'")),
        Index("ix_economy_requests_batch", "message_batch_id"),
        Index("ix_economy_requests_unread", "job_id", postgresql_where=text("state = 'done' AND consumed_at IS NULL"),
              sqlite_where=text("state = 'done' AND consumed_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    job_version: Mapped[int] = mapped_column(Integer)
    purpose: Mapped[str] = mapped_column(String(20))  # the call's stage: triage | work | format_check
    tier: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(100))
    # 1, then 2 for the one resubmission of an expired request (a second expiry goes standard).
    round: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # pending -> submitting (claimed into a message batch) -> submitted -> done; dropped (its job
    # ended before it was submitted)
    state: Mapped[str] = mapped_column(String(20), default="pending")
    params: Mapped[dict[str, Any]] = mapped_column(Json)
    custom_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    message_batch_id: Mapped[int | None] = mapped_column(ForeignKey("message_batches.id", ondelete="SET NULL"))
    # succeeded | errored | expired | canceled, and the API's result object
    result_type: Mapped[str | None] = mapped_column(String(20))
    result: Mapped[dict[str, Any] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    consumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
