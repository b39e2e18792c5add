"""The shapes of the API's answers, for the OpenAPI document and for checking what is sent.

Money is a decimal string ("0.00123400"), never a float, so sums stay exact. Times are ISO 8601
with a UTC offset."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Money = str


class Error(BaseModel):
    detail: str = Field(description="One sentence: what was wrong and where.")
    errors: list[dict[str, Any]] | None = Field(None, description="For a bad request: each problem, with where.")
    item: int | None = Field(None, description="A batch body's bad item: its 0-based index in a JSON array.")
    line: int | None = Field(None, description="A batch body's bad item: its 1-based line in JSON Lines.")


class JobSubmitted(BaseModel):
    id: int
    batch_id: int
    batch: str
    key: str
    created: bool = Field(description="False when the batch already had a job with this key (nothing was added).")
    status: str


class BatchSubmitted(BaseModel):
    batch_id: int
    batch: str
    read: int = Field(description="Jobs in the body.")
    accepted: int = Field(description="New jobs written.")
    duplicates: int = Field(description="Jobs whose key the batch already had.")


class JobSummary(BaseModel):
    id: int
    batch: str
    key: str
    kind: str
    status: str
    tier: str | None
    difficulty: str | None
    attempt: int
    escalations: int
    cost_usd: Money
    created_at: datetime
    finished_at: datetime | None
    error: str | None


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last one.")


class Routing(BaseModel):
    reason_kind: str = Field(description="triage | pinned | retry | escalation")
    verdict: str | None
    confidence: float | None
    reason: str | None
    from_tier: str | None
    to_tier: str
    at: datetime


class Call(BaseModel):
    id: int
    stage: str
    tier: str
    model: str
    attempt: int
    delivery: int
    outcome: str
    applied: bool
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: Money
    latency_ms: float | None
    request_id: str | None
    status_code: int | None
    stop_reason: str | None
    error_type: str | None
    error_message: str | None
    started_at: datetime
    finished_at: datetime | None


class Verdict(BaseModel):
    tier: str
    attempt: int
    validator: str
    ok: bool
    problems: list[str]
    at: datetime


class Event(BaseModel):
    from_status: str | None
    to_status: str
    at: datetime
    detail: str | None


class JobStory(BaseModel):
    """A job and everything that happened to it, each list in the order it happened."""

    job: JobSummary
    payload: dict[str, Any]
    metadata: dict[str, Any] | None
    pinned_tier: str | None
    output: Any = None
    task: str | None = Field(None, description="The task the job named, bound at submission; null without one.")
    task_version: int | None = Field(None, description="The version of that task the job keeps for life.")
    next_try_at: datetime | None = Field(None, description="A stage waiting out transient errors (429, 529, 5xx, "
                                         "timeouts): when it is tried again; null otherwise.")
    transient_since: datetime | None = Field(None, description="Since when that stage has met only transient errors "
                                             "(the job fails past SWITCHYARD_TRANSIENT_PATIENCE_S from there).")
    routing: list[Routing]
    calls: list[Call]
    validations: list[Verdict]
    events: list[Event]


class BatchSummary(BaseModel):
    id: int
    name: str
    created_at: datetime
    cancelled_at: datetime | None
    jobs: int
    done: int = Field(description="Jobs that have finished: succeeded, failed or cancelled.")
    finished: bool
    by_status: dict[str, int]
    cost_usd: Money
    priority: int = Field(description="0-9: the dispatcher admits a higher priority's queued jobs first.")


class BatchList(BaseModel):
    batches: list[BatchSummary]


class Cancelled(BaseModel):
    batch: str
    batch_id: int
    cancelled: int = Field(description="Jobs cancelled now: queued ones, and ones waiting out transient errors "
                                       "between tries. Jobs in a call right now finish.")
    cancelled_at: datetime
    waiting: int = Field(description="Of those, the jobs that were waiting out transient errors.")


class BudgetState(BaseModel):
    batch_id: int
    batch: str
    budget_usd: Money | None = Field(description="The batch's spending cap; null: none.")
    spent_usd: Money = Field(description="What the batch's budgeted calls have cost.")
    reserved_usd: Money = Field(description="The worst-case cost of its calls in flight, held against the budget.")
    paused: int = Field(description="Jobs paused because their next call did not fit.")
    exhausted: bool = Field(description="The batch has a budget and jobs paused for it.")


class TierStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    tier: str
    jobs: int
    calls: int
    input_tokens: int = Field(description="Uncached input: what came after the last cache breakpoint.")
    output_tokens: int
    cache_creation_input_tokens: int = Field(description="Input written to the prompt cache.")
    cache_read_input_tokens: int = Field(description="Input read from the prompt cache.")
    cost_usd: Money
    cache_hit_rate: float | None = Field(
        description="The share of all input tokens read from the cache: cache reads over cache reads, cache "
                    "writes and uncached input. Null when the tier had no input.")
    cache_saving_usd: Money | None = Field(
        description="What caching saved: these calls' cost had every cache token been billed as plain input, "
                    "less their cost, at the tier's configured prices. Null for a tier no longer configured.")


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")

    jobs: int
    by_status: dict[str, int]
    tiers: list[TierStats]
    cost_usd: Money
    cache_hit_rate: float | None = Field(description="Over all tiers; null when there was no input.")
    cache_saving_usd: Money = Field(description="Over all tiers.")


class QualityReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    reference_tier: str
    jobs: int
    succeeded: int
    shadowed: int = Field(description="Jobs sampled for shadow evaluation.")
    evaluated: int = Field(description="Shadowed jobs with an agreement recorded.")
    agreement: float | None = Field(description="Stratified estimate over the succeeded jobs; null when no "
                                                "stratum can be estimated.")
    agreement_low: float | None
    agreement_high: float | None
    cost_usd: Money
    reference_cost_usd: Money = Field(description="Had every job been answered by the reference tier.")
    evaluation_cost_usd: Money = Field(description="Shadow and judge calls: not part of the jobs' cost.")
    strata: list[dict[str, Any]]
    notes: list[str]


class TenantUsage(BaseModel):
    tenant: str
    jobs_in_flight: int
    max_jobs_in_flight: int | None
    spend_today_usd: Money
    max_spend_per_day_usd: Money | None


class QueueLine(BaseModel):
    queue: str
    depth: int = Field(description="Messages waiting in the broker queue.")
    reserved: int = Field(description="Messages workers hold (running or waiting out a countdown).")
    in_flight: int = Field(description="Jobs in the stage this queue serves.")
    workers: int
    concurrency: int
    busy: int
    paused_s: float = Field(description="Seconds the tier is paused by a rate limit (a 429 from the API).")
    retrying: int = Field(0, description="Jobs of the stage waiting out transient errors (429, 529, 5xx) "
                                         "before trying again; counted in in_flight.")


class QueueStatus(BaseModel):
    """The operator's view (`switchyard status`), without worker hosts, and this tenant's standing."""

    queues: list[QueueLine]
    queued: int = Field(description="Every tenant's jobs waiting to be dispatched.")
    in_flight: dict[str, dict[str, int]] = Field(description="Jobs in a stage: status -> tier -> jobs.")
    finished_1m: dict[str, int]
    finished_5m: dict[str, int]
    tenant: TenantUsage


class Health(BaseModel):
    status: str = Field(description="ok, or failing")
    postgres: str
    broker: str
