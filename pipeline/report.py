"""The routing math: per-tier jobs, calls, tokens and cost, and the saving against sending every
job to the top tier. Read straight from the rows, so anyone can check it with SQL."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, literal, select, true
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.models import Batch, Job, JobStatus, ModelCall, RoutingDecision, Stage, ValidationVerdict
from pipeline.pricing import MILLION


@dataclass
class TierLine:
    tier: str
    jobs: int = 0  # jobs that finished at this tier
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

    @property
    def escalation_rate(self) -> float | None:
        return self.escalations / self.worked if self.worked else None

    @property
    def validation_failure_rate(self) -> float | None:
        return self.validation_failures / self.validations if self.validations else None


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

    @property
    def saving(self) -> Decimal:
        return self.top_tier_cost_usd - self.cost_usd

    @property
    def saving_ratio(self) -> float:
        return float(self.saving / self.top_tier_cost_usd) if self.top_tier_cost_usd else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived rates; money as exact decimal strings."""
        tiers = []
        for t in self.tiers:
            line = {f.name: getattr(t, f.name) for f in fields(t)}
            line.update(escalation_rate=t.escalation_rate, validation_failure_rate=t.validation_failure_rate)
            tiers.append({k: f"{v:f}" if isinstance(v, Decimal) else v for k, v in line.items()})
        return {
            "jobs": self.jobs, "by_status": self.by_status, "tiers": tiers, "escalations": self.escalations,
            "validation_failures": self.validation_failures, "cost_usd": f"{self.cost_usd:f}",
            "top_tier": self.top_tier, "top_tier_cost_usd": f"{self.top_tier_cost_usd:f}",
            "saving_usd": f"{self.saving:f}", "saving_ratio": self.saving_ratio,
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


# (statement on a child table, its job_id column) -> the statement, kept to the summarized jobs
Scoped = Callable[[Any, Any], Any]


def _child_scope(session: Session, job_filter: Any, *, jobs: int, lo: int, hi: int) -> Scoped:
    """How a query on calls, decisions or verdicts keeps only the rows of the summarized jobs.

    Every such query is bounded by the jobs' id range, so it reads the child table's job_id
    index over that range instead of scanning the table (joined to jobs, the planner scans all
    of routing_decisions and validation_verdicts to hash-join a batch's 10,000 jobs). When no
    other job has an id in the range (the usual case: a batch is enqueued in one go, and a time
    window is a stretch of ids), the range alone selects the rows and the join to jobs is
    dropped. Otherwise the join applies the filter to what the range reads."""
    only_these = hi - lo + 1 == jobs or session.scalar(
        select(func.count()).select_from(Job).where(Job.id.between(lo, hi))) == jobs

    def scoped(stmt: Any, job_id: Any) -> Any:
        stmt = stmt.where(job_id.between(lo, hi))
        return stmt if only_these else stmt.join(Job, Job.id == job_id).where(job_filter)

    return scoped


def _calls(session: Session, scoped: Scoped, line_for: Callable[[str], TierLine]) -> None:
    """Per tier: calls, tokens, cost, failed/repeated/abandoned calls, jobs worked, latencies."""
    repeated = ModelCall.delivery > 1
    postgres = session.get_bind().dialect.name == "postgresql"
    columns = [
        ModelCall.tier, func.count(), func.sum(ModelCall.input_tokens), func.sum(ModelCall.output_tokens),
        func.sum(ModelCall.cost_usd), func.sum(ModelCall.cache_creation_input_tokens),
        func.sum(ModelCall.cache_read_input_tokens), func.count().filter(ModelCall.outcome == "error"),
        func.count().filter(repeated), func.coalesce(func.sum(ModelCall.cost_usd).filter(repeated), 0),
        func.count().filter(ModelCall.outcome == "abandoned"),
        func.count(func.distinct(ModelCall.job_id)).filter(ModelCall.stage == Stage.WORK),
    ]
    if postgres:
        # In the same pass: percentile_cont skips the calls without a latency.
        columns += [func.percentile_cont(0.5).within_group(ModelCall.latency_ms),
                    func.percentile_cont(0.95).within_group(ModelCall.latency_ms)]
    for row in session.execute(scoped(select(*columns).group_by(ModelCall.tier), ModelCall.job_id)):
        tier, n, tin, tout, cost, cw, cr, failed, rep, rep_cost, abandoned, worked = row[:12]
        line = line_for(tier)
        line.calls, line.input_tokens, line.output_tokens = n, int(tin or 0), int(tout or 0)
        line.cost_usd = Decimal(cost or 0)
        line.cache_creation_input_tokens, line.cache_read_input_tokens = int(cw or 0), int(cr or 0)
        line.failed_calls, line.repeated_calls, line.abandoned_calls = int(failed), int(rep), int(abandoned)
        line.repeated_cost_usd, line.worked = Decimal(rep_cost), int(worked)
        if postgres:
            line.p50_latency_ms, line.p95_latency_ms = row[12], row[13]
    if not postgres:
        _latencies(session, scoped, line_for)


def _latencies(session: Session, scoped: Scoped, line_for: Callable[[str], TierLine]) -> None:
    """SQLite (the demo) has no percentile_cont: the same interpolation in Python, on a demo's rows.
    (On Postgres ``_calls`` computes them.)"""
    by_tier: dict[str, list[float]] = defaultdict(list)
    for tier, ms in session.execute(scoped(select(ModelCall.tier, ModelCall.latency_ms)
                                           .where(ModelCall.latency_ms.is_not(None)), ModelCall.job_id)):
        by_tier[tier].append(float(ms or 0))
    for tier, values in by_tier.items():
        line = line_for(tier)
        line.p50_latency_ms, line.p95_latency_ms = percentile(values, 0.5), percentile(values, 0.95)


def _last_work_tokens(session: Session, scoped: Scoped) -> tuple[int, int]:
    """Input and output tokens of each job's last successful work call, summed."""
    # The stage as a literal, so that a prepared (generic) plan can still use the partial index of
    # work calls.
    ok_work = (ModelCall.stage == literal(Stage.WORK.value, literal_execute=True), ModelCall.outcome == "ok")
    if session.get_bind().dialect.name == "postgresql":
        # DISTINCT ON picks each job's newest such call in one pass over the range.
        last = scoped(select(ModelCall.input_tokens, ModelCall.output_tokens).where(*ok_work)
                      .ext(distinct_on(ModelCall.job_id)).order_by(ModelCall.job_id, ModelCall.id.desc()),
                      ModelCall.job_id).subquery()
        row = session.execute(select(func.coalesce(func.sum(last.c.input_tokens), 0),
                                     func.coalesce(func.sum(last.c.output_tokens), 0))).one()
        return int(row[0]), int(row[1])
    last_id = scoped(select(func.max(ModelCall.id).label("id")).where(*ok_work).group_by(ModelCall.job_id),
                     ModelCall.job_id).subquery()
    row = session.execute(
        select(func.coalesce(func.sum(ModelCall.input_tokens), 0), func.coalesce(func.sum(ModelCall.output_tokens), 0))
        .join(last_id, last_id.c.id == ModelCall.id)
    ).one()
    return int(row[0]), int(row[1])


def summarize(session: Session, config: ModelConfig, *, batch_id: int | None = None,
              since: datetime | None = None, until: datetime | None = None,
              tenant_id: int | None = None) -> Summary:
    """Per-tier figures for the jobs of a batch and/or created in [since, until), or all jobs.

    Every call a job made counts, including failed, repeated and abandoned ones: they were requests
    the API saw. Each figure is a plain aggregate over the rows, so the sums can be checked in SQL.

    Five statements (six when the jobs' ids have gaps): the jobs, in one pass that also yields their
    id range, then calls, escalations, verdicts and the top-tier comparison, each read over that
    id range (``_child_scope``). A 10,000-job batch among a million jobs reads some 50,000 rows,
    all through indexes."""
    conds: list[Any] = []
    if tenant_id is not None:
        conds.append(Job.batch_id.in_(select(Batch.id).where(Batch.tenant_id == tenant_id)))
    if batch_id is not None:
        conds.append(Job.batch_id == batch_id)
    if since is not None:
        conds.append(Job.created_at >= since)
    if until is not None:
        conds.append(Job.created_at < until)
    job_filter = and_(true(), *conds)
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

    tin = tout = 0
    if lo is not None and hi is not None:
        scoped = _child_scope(session, job_filter, jobs=sum(by_status.values()), lo=lo, hi=hi)
        _calls(session, scoped, line_for)
        for tier, n in session.execute(scoped(
            select(RoutingDecision.from_tier, func.count())
            # A literal, not a bound parameter, so that a prepared (generic) plan can still use the
            # partial index of escalations.
            .where(RoutingDecision.reason_kind == literal("escalation", literal_execute=True))
            .group_by(RoutingDecision.from_tier), RoutingDecision.job_id)
        ):
            line_for(tier or "-").escalations = n
        for tier, n, bad in session.execute(scoped(
            select(ValidationVerdict.tier, func.count(), func.count().filter(ValidationVerdict.ok.is_(False)))
            .group_by(ValidationVerdict.tier), ValidationVerdict.job_id)
        ):
            line = line_for(tier)
            line.validations, line.validation_failures = n, int(bad)
        # What the top tier would have cost: each job's last successful work call, same tokens,
        # the top tier's prices. No triage and no format checks in that world.
        tin, tout = _last_work_tokens(session, scoped)
    failures = sum(t.validation_failures for t in tiers.values())
    top = config.tier(config.top_tier)
    top_cost = (Decimal(tin) * top.input_per_mtok + Decimal(tout) * top.output_per_mtok) / MILLION

    total = sum((t.cost_usd for t in tiers.values()), Decimal(0))
    order = {name: i for i, name in enumerate([config.triage_tier, *config.work_tiers])}
    lines = sorted(tiers.values(), key=lambda t: order.get(t.tier, 99))
    return Summary(
        jobs=sum(by_status.values()), by_status=by_status, tiers=lines, escalations=escalations,
        validation_failures=int(failures), cost_usd=total, top_tier=config.top_tier, top_tier_cost_usd=top_cost,
    )


def terminal_count(session: Session, *, batch_id: int) -> tuple[int, int]:
    """(terminal jobs, all jobs) in a batch."""
    done = case((Job.status.in_([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]), 1), else_=0)
    row = session.execute(select(func.coalesce(func.sum(done), 0), func.count()).where(Job.batch_id == batch_id)).one()
    return int(row[0]), int(row[1])
