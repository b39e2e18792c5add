"""The routing math: per-tier jobs, calls, tokens and cost, and the saving against sending every
job to the top tier; and the most common reasons jobs failed. Read straight from the rows, so
anyone can check it with SQL."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, and_, bindparam, case, func, literal, literal_column, null, select, true, union_all
from sqlalchemy.dialects.postgresql import array, distinct_on
from sqlalchemy.orm import Session

from pipeline.claude.pricing import MILLION, Usage, call_cost
from pipeline.config import ModelConfig
from pipeline.models import (
    EVALUATION_STAGES,
    Batch,
    Job,
    JobStatus,
    ModelCall,
    RoutingDecision,
    Stage,
    ValidationVerdict,
)


@dataclass
class TierLine:
    tier: str
    # Jobs whose tier this is: where they ended, or where they are now if still running (a job
    # has a tier once triage or a pin routes it, and an escalation moves it up).
    jobs: int = 0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    failed_calls: int = 0  # outcome "error": the API said no, or retries ran out
    # Calls made by a second or later delivery of a stage (a worker died or a message was repeated),
    # and calls whose worker died before they reported ("abandoned"): real requests, maybe billed.
    repeated_calls: int = 0
    repeated_cost_usd: Decimal = Decimal(0)
    abandoned_calls: int = 0
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    worked: int = 0  # distinct jobs with a work call at this tier
    escalations: int = 0  # jobs moved up from this tier after failing validation
    validations: int = 0  # verdicts on this tier's answers
    validation_failures: int = 0
    # What prompt caching saved: these calls' cost had every cache token been billed as plain
    # input, less their cost (``cache_saving``). None when the configuration no longer has the tier.
    cache_saving_usd: Decimal | None = Decimal(0)

    @property
    def escalation_rate(self) -> float | None:
        return self.escalations / self.worked if self.worked else None

    @property
    def cache_hit_rate(self) -> float | None:
        return hit_rate(self.cache_read_input_tokens, self.cache_creation_input_tokens, self.input_tokens)

    @property
    def validation_failure_rate(self) -> float | None:
        return self.validation_failures / self.validations if self.validations else None


def hit_rate(read: int, written: int, uncached: int) -> float | None:
    """The share of all input tokens read from the cache: cache reads over reads, writes and
    uncached input. A call's usage does not say how much of its uncached input could have been
    cached (the job's own text never can), so every input token counts."""
    total = read + written + uncached
    return read / total if total else None


def cache_saving(config: ModelConfig, tier: str, *, read: int, written: int) -> Decimal | None:
    """What caching saved on a tier's calls that read ``read`` and wrote ``written`` cache tokens:
    their price as plain input, less their price as cache reads and writes, at the tier's configured
    input price and cache TTL (the other tokens cost the same either way). Negative when the
    writes were not read back enough to pay for their premium. None for cache tokens of a tier the
    configuration no longer has, which it cannot price."""
    if not read and not written:
        return Decimal(0)
    if tier not in config.tiers:
        return None
    t = config.tiers[tier]
    per_in = t.input_per_mtok / MILLION
    return per_in * (read * (1 - config.cache_read_multiplier)
                     + written * (1 - config.cache_write_multiplier_for(t.cache_ttl)))


@dataclass(frozen=True)
class FailureReason:
    reason: str  # jobs.failure_reason: the same for every job that failed the same way
    jobs: int


@dataclass
class Summary:
    jobs: int
    by_status: dict[str, int]
    tiers: list[TierLine]
    escalations: int
    validation_failures: int
    cost_usd: Decimal
    top_tier: str
    top_tier_cost_usd: Decimal
    # The most common reasons the jobs failed, most first (``failure_reasons``).
    failure_reasons: list[FailureReason] = field(default_factory=list)

    @property
    def saving(self) -> Decimal:
        return self.top_tier_cost_usd - self.cost_usd

    @property
    def saving_ratio(self) -> float:
        return float(self.saving / self.top_tier_cost_usd) if self.top_tier_cost_usd else 0.0

    @property
    def cache_hit_rate(self) -> float | None:
        """Over all tiers (``hit_rate``)."""
        return hit_rate(*(sum(getattr(t, a) for t in self.tiers)
                          for a in ("cache_read_input_tokens", "cache_creation_input_tokens", "input_tokens")))

    @property
    def cache_saving_usd(self) -> Decimal:
        """Over the tiers the configuration prices."""
        return sum((t.cache_saving_usd for t in self.tiers if t.cache_saving_usd is not None), Decimal(0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived rates; money as exact decimal strings."""
        tiers = []
        for t in self.tiers:
            line = {f.name: getattr(t, f.name) for f in fields(t)}
            line.update(escalation_rate=t.escalation_rate, validation_failure_rate=t.validation_failure_rate,
                        cache_hit_rate=t.cache_hit_rate)
            tiers.append({k: f"{v:f}" if isinstance(v, Decimal) else v for k, v in line.items()})
        return {
            "jobs": self.jobs, "by_status": self.by_status, "tiers": tiers, "escalations": self.escalations,
            "validation_failures": self.validation_failures, "cost_usd": f"{self.cost_usd:f}",
            "top_tier": self.top_tier, "top_tier_cost_usd": f"{self.top_tier_cost_usd:f}",
            "saving_usd": f"{self.saving:f}", "saving_ratio": self.saving_ratio,
            "cache_hit_rate": self.cache_hit_rate, "cache_saving_usd": f"{self.cache_saving_usd:f}",
            "failure_reasons": [{"reason": r.reason, "jobs": r.jobs} for r in self.failure_reasons],
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks: what Postgres's percentile_cont computes."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# The summarized jobs' id range, bound when a statement runs: the statements that read the child
# tables over it are then the same for every batch, and are built once (``_per_tier_in_range``).
LO = bindparam("lo", type_=BigInteger)
HI = bindparam("hi", type_=BigInteger)

# (statement on a child table, its job_id column) -> the statement, kept to the summarized jobs
Scoped = Callable[[Any, Any], Any]


def _only_these(session: Session, *, jobs: int, lo: int, hi: int) -> bool:
    """Whether the summarized jobs are all the jobs with an id in [lo, hi]."""
    return hi - lo + 1 == jobs or session.scalar(
        select(func.count()).select_from(Job).where(Job.id.between(lo, hi))) == jobs


def _child_scope(job_filter: Any | None) -> Scoped:
    """How a query on calls, decisions or verdicts keeps only the rows of the summarized jobs.

    Every such query is bounded by the jobs' id range, so it reads the child table's job_id
    index over that range instead of scanning the table (joined to jobs, the planner scans all
    of routing_decisions and validation_verdicts to hash-join a batch's 10,000 jobs). When no
    other job has an id in the range (the usual case: a batch is enqueued in one go, and a time
    window is a stretch of ids), the range alone selects the rows: ``job_filter`` is None and the
    join to jobs is dropped. Otherwise the join applies the filter to what the range reads."""

    def scoped(stmt: Any, job_id: Any) -> Any:
        stmt = stmt.where(job_id.between(LO, HI))
        return stmt if job_filter is None else stmt.join(Job, Job.id == job_id).where(job_filter)

    return scoped


# A job's own calls: shadow evaluation's (pipeline.flow.shadow) are evaluation cost, reported by
# `switchyard quality`, never as a tier's cost here.
_JOB_CALL = ModelCall.stage.not_in([s.value for s in EVALUATION_STAGES])


def _tagged(kind: str, *columns: Any) -> Any:
    """A select whose rows say which figures they carry (the arms of ``_per_tier``)."""
    return select(literal_column(f"'{kind}'"), *columns)


def _calls(scoped: Scoped, postgres: bool) -> Any:
    """Per tier: calls, tokens, cost, failed/repeated/abandoned calls, jobs worked, and the latency
    percentiles as [p50, p95] (NULL on SQLite, which has no percentile_cont: see ``_latencies``)."""
    repeated = ModelCall.delivery > 1
    work = ModelCall.stage == Stage.WORK
    figures: list[Any] = [
        func.count(), func.sum(ModelCall.input_tokens), func.sum(ModelCall.output_tokens),
        func.sum(ModelCall.cost_usd), func.sum(ModelCall.cache_creation_input_tokens),
        func.sum(ModelCall.cache_read_input_tokens), func.count().filter(ModelCall.outcome == "error"),
        func.count().filter(repeated), func.coalesce(func.sum(ModelCall.cost_usd).filter(repeated), 0),
        func.count().filter(ModelCall.outcome == "abandoned"),
    ]
    if not postgres:
        columns = [ModelCall.tier, *figures, func.count(func.distinct(ModelCall.job_id)).filter(work)]
        return scoped(_tagged("calls", *columns, null()).where(_JOB_CALL).group_by(ModelCall.tier), ModelCall.job_id)
    # Ordered aggregates (percentile_cont, count(DISTINCT)) rule out hashing the groups: Postgres
    # then sorts every call row by tier, and forming and sorting those rows took a third of the
    # statement's time. Hashed instead, each tier collects its latencies and its work calls' job
    # ids, and only those values are sorted. percentile_cont skips the NULL latencies.
    by_tier = scoped(select(ModelCall.tier, *figures, func.array_agg(ModelCall.latency_ms).label("ms"),
                            func.array_agg(ModelCall.job_id).filter(work).label("worked"))
                     .where(_JOB_CALL).group_by(ModelCall.tier), ModelCall.job_id).subquery()
    # unnest in a select list streams the values; in FROM it would first copy them into a tuplestore.
    ms = select(func.unnest(by_tier.c.ms).label("v")).correlate(by_tier).subquery()
    worked = select(func.unnest(by_tier.c.worked).label("v")).correlate(by_tier).subquery()
    return _tagged("calls", *[c for c in by_tier.c if c.name not in ("ms", "worked")],
                   select(func.count(worked.c.v.distinct())).scalar_subquery(),
                   select(func.percentile_cont(array([0.5, 0.95])).within_group(ms.c.v)).scalar_subquery())


def _latencies(session: Session, scoped: Scoped, bounds: dict[str, int],
               line_for: Callable[[str], TierLine]) -> None:
    """SQLite (the demo) has no percentile_cont: the same interpolation in Python, on a demo's rows.
    (On Postgres ``_calls`` computes them.)"""
    by_tier: dict[str, list[float]] = defaultdict(list)
    for tier, ms in session.execute(scoped(select(ModelCall.tier, ModelCall.latency_ms)
                                           .where(ModelCall.latency_ms.is_not(None), _JOB_CALL),
                                           ModelCall.job_id), bounds):
        by_tier[tier].append(float(ms or 0))
    for tier, values in by_tier.items():
        line = line_for(tier)
        line.p50_latency_ms, line.p95_latency_ms = percentile(values, 0.5), percentile(values, 0.95)


def _last_work_tokens(scoped: Scoped, postgres: bool) -> Any:
    """Input, output, cache write and cache read tokens of each job's last successful work call, summed."""
    # The stage as a literal, so that a prepared (generic) plan can still use the partial index of
    # work calls.
    ok_work = (ModelCall.stage == literal(Stage.WORK.value, literal_execute=True), ModelCall.outcome == "ok")
    tokens = (ModelCall.input_tokens, ModelCall.output_tokens, ModelCall.cache_creation_input_tokens,
              ModelCall.cache_read_input_tokens)
    if postgres:
        # DISTINCT ON picks each job's newest such call in one pass over the range.
        last = scoped(select(*tokens).where(*ok_work)
                      .ext(distinct_on(ModelCall.job_id)).order_by(ModelCall.job_id, ModelCall.id.desc()),
                      ModelCall.job_id).subquery()
        return _tagged("top", null(), *[func.coalesce(func.sum(last.c[t.key]), 0) for t in tokens])
    last_id = scoped(select(func.max(ModelCall.id).label("id")).where(*ok_work).group_by(ModelCall.job_id),
                     ModelCall.job_id).subquery()
    return (_tagged("top", null(), *[func.coalesce(func.sum(t), 0) for t in tokens])
            .join_from(ModelCall, last_id, last_id.c.id == ModelCall.id))


def _per_tier(scoped: Scoped, postgres: bool) -> Any:
    """Calls, escalations and verdicts per tier, and the tokens of the top-tier comparison: one
    statement, so one round trip. Each row starts with its kind and tier; the shorter arms are
    padded with NULLs to the width of the calls."""
    arms = [
        _calls(scoped, postgres),
        # A literal, not a bound parameter, so that a prepared (generic) plan can still use the
        # partial index of escalations.
        scoped(_tagged("escalations", RoutingDecision.from_tier, func.count())
               .where(RoutingDecision.reason_kind == literal("escalation", literal_execute=True))
               .group_by(RoutingDecision.from_tier), RoutingDecision.job_id),
        scoped(_tagged("verdicts", ValidationVerdict.tier, func.count(),
                       func.count().filter(ValidationVerdict.ok.is_(False)))
               .group_by(ValidationVerdict.tier), ValidationVerdict.job_id),
        # What the top tier would have cost: each job's last successful work call, same tokens,
        # the top tier's prices. No triage and no format checks in that world.
        _last_work_tokens(scoped, postgres),
    ]
    width = len(arms[0].selected_columns)
    return union_all(*[arm.add_columns(*[null()] * (width - len(arm.selected_columns))) for arm in arms])


@functools.cache
def _per_tier_in_range(postgres: bool) -> Any:
    """``_per_tier`` for the usual case, where the id range alone selects the rows."""
    return _per_tier(_child_scope(None), postgres)


def summarize(session: Session, config: ModelConfig, *, batch_id: int | None = None,
              since: datetime | None = None, until: datetime | None = None,
              tenant_id: int | None = None) -> Summary:
    """Per-tier figures for the jobs of a batch and/or created in [since, until), or all jobs.

    On Postgres, without a time window, from the rollups (``rollups.summarize``); what follows is
    the same figures from the raw rows, for a time window and for SQLite, and what
    `switchyard db rebuild-rollups` is checked against.

    Every call a job made counts, including failed, repeated and abandoned ones: they were requests
    the API saw. Each figure is a plain aggregate over the rows, so the sums can be checked in SQL.

    Two statements: the jobs, in one pass that also yields their id range, then calls,
    escalations, verdicts and the top-tier comparison in one statement (``_per_tier``), each read
    over that id range (``_child_scope``). One more when other jobs have ids in that range
    (``_only_these``), and on SQLite one more for the percentiles (``_latencies``). A 10,000-job
    batch among a million jobs reads some 50,000 rows, all through indexes."""
    if since is None and until is None and session.get_bind().dialect.name == "postgresql":
        # A batch, a tenant or everything: the rollups and the jobs not folded yet, a few rows a
        # batch whatever its size (pipeline.queries.rollups). A time window selects jobs by their
        # creation, which the rollups do not keep: it reads the rows, as below.
        from pipeline.queries import rollups

        return rollups.summarize(session, config, batch_id=batch_id, tenant_id=tenant_id)
    job_filter = _job_filter(batch_id=batch_id, since=since, until=until, tenant_id=tenant_id)
    tiers = {name: TierLine(name) for name in config.tiers}

    def line_for(tier: str) -> TierLine:
        return tiers.setdefault(tier, TierLine(tier))

    # The jobs in one pass: per status and tier, with their escalations and their id range.
    by_status: dict[str, int] = {}
    escalations = 0
    lo: int | None = None
    hi: int | None = None
    for status, tier, n, esc, first, last in session.execute(
        select(Job.status, Job.tier, func.count(), func.coalesce(func.sum(Job.escalations), 0), func.min(Job.id),
               func.max(Job.id)).where(job_filter).group_by(Job.status, Job.tier)
    ):
        key = str(status.value if isinstance(status, JobStatus) else status)
        by_status[key] = by_status.get(key, 0) + n
        if tier is not None:
            line_for(tier).jobs += n
        escalations += int(esc)
        lo = first if lo is None else min(lo, first)
        hi = last if hi is None else max(hi, last)

    top_usage = Usage()
    if lo is not None and hi is not None:
        postgres = session.get_bind().dialect.name == "postgresql"
        bounds = {"lo": lo, "hi": hi}
        if _only_these(session, jobs=sum(by_status.values()), lo=lo, hi=hi):
            scoped, per_tier = _child_scope(None), _per_tier_in_range(postgres)
        else:
            scoped = _child_scope(job_filter)
            per_tier = _per_tier(scoped, postgres)
        for kind, tier, *figures in session.execute(per_tier, bounds):
            if kind == "calls":
                n, inp, outp, cost, cw, cr, failed, rep, rep_cost, abandoned, worked, ms = figures
                line = line_for(tier)
                line.calls, line.input_tokens, line.output_tokens = n, int(inp or 0), int(outp or 0)
                line.cost_usd = Decimal(cost or 0)
                line.cache_creation_input_tokens, line.cache_read_input_tokens = int(cw or 0), int(cr or 0)
                line.failed_calls, line.repeated_calls, line.abandoned_calls = int(failed), int(rep), int(abandoned)
                line.repeated_cost_usd, line.worked = Decimal(rep_cost), int(worked)
                if ms is not None:  # [p50, p95]; NULL on SQLite, or when no call of the tier has a latency
                    line.p50_latency_ms, line.p95_latency_ms = ms
            elif kind == "escalations":
                line_for(tier or "-").escalations = figures[0]
            elif kind == "verdicts":
                line = line_for(tier)
                line.validations, line.validation_failures = figures[0], int(figures[1])
            else:  # "top"
                top_usage = Usage(*(int(n) for n in figures[:4]))
        if not postgres:
            _latencies(session, scoped, bounds, line_for)
    for line in tiers.values():
        line.cache_saving_usd = cache_saving(config, line.tier, read=line.cache_read_input_tokens,
                                             written=line.cache_creation_input_tokens)
    failures = sum(t.validation_failures for t in tiers.values())
    # The same tokens at the top tier's prices, its cache tokens as the same writes and reads there.
    top_cost = call_cost(config.tier(config.top_tier), top_usage, config=config)

    total = sum((t.cost_usd for t in tiers.values()), Decimal(0))
    order = {name: i for i, name in enumerate([config.triage_tier, *config.work_tiers])}
    lines = sorted(tiers.values(), key=lambda t: order.get(t.tier, 99))
    return Summary(
        jobs=sum(by_status.values()), by_status=by_status, tiers=lines, escalations=escalations,
        validation_failures=int(failures), cost_usd=total, top_tier=config.top_tier, top_tier_cost_usd=top_cost,
        failure_reasons=_failure_reasons(session, job_filter) if by_status.get(JobStatus.FAILED.value) else [],
    )


def _job_filter(*, batch_id: int | None = None, since: datetime | None = None, until: datetime | None = None,
                tenant_id: int | None = None) -> Any:
    """The jobs a summary covers: of a batch and/or created in [since, until), of a tenant, or all."""
    conds: list[Any] = []
    if tenant_id is not None:
        conds.append(Job.batch_id.in_(select(Batch.id).where(Batch.tenant_id == tenant_id)))
    if batch_id is not None:
        conds.append(Job.batch_id == batch_id)
    if since is not None:
        conds.append(Job.created_at >= since)
    if until is not None:
        conds.append(Job.created_at < until)
    return and_(true(), *conds)


def failure_reasons(session: Session, *, batch_id: int | None = None, since: datetime | None = None,
                    until: datetime | None = None, tenant_id: int | None = None,
                    limit: int = 5) -> list[FailureReason]:
    """The ``limit`` most common reasons the selected jobs failed, each with how many jobs failed
    for it, most first (ties by the reason's text). What every summary shows: `switchyard demo`,
    `enqueue --wait` and `stats`.

    Jobs are grouped by ``failure_reason``, a few words that are the same for every job that failed
    the same way ("work call to sonnet: 400 invalid_request_error"), not by ``error``, which carries
    each job's own detail; a job failed before that column existed is grouped by its error. Only
    failed jobs are read: for a batch through ``ix_jobs_batch_id_status_id``."""
    return _failure_reasons(session, _job_filter(batch_id=batch_id, since=since, until=until, tenant_id=tenant_id),
                            limit=limit)


def _failure_reasons(session: Session, job_filter: Any, *, limit: int = 5) -> list[FailureReason]:
    reason = func.coalesce(Job.failure_reason, Job.error, literal("(no reason recorded)"))
    n = func.count()
    rows = session.execute(select(reason, n).where(job_filter, Job.status == JobStatus.FAILED)
                           .group_by(reason).order_by(n.desc(), reason).limit(limit))
    return [FailureReason(str(r), int(c)) for r, c in rows]


def terminal_count(session: Session, *, batch_id: int) -> tuple[int, int]:
    """(terminal jobs, all jobs) in a batch."""
    done = case((Job.status.in_([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]), 1), else_=0)
    row = session.execute(select(func.coalesce(func.sum(done), 0), func.count()).where(Job.batch_id == batch_id)).one()
    return int(row[0]), int(row[1])
