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

from sqlalchemy import and_, case, func, select, true
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


def _latencies(session: Session, job_filter: Any, line_for: Callable[[str], TierLine]) -> None:
    has_latency = ModelCall.latency_ms.is_not(None)
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(
            select(ModelCall.tier,
                   func.percentile_cont(0.5).within_group(ModelCall.latency_ms),
                   func.percentile_cont(0.95).within_group(ModelCall.latency_ms))
            .join(Job, Job.id == ModelCall.job_id).where(job_filter, has_latency).group_by(ModelCall.tier)
        )
        for tier, p50, p95 in rows:
            line = line_for(tier)
            line.p50_latency_ms, line.p95_latency_ms = p50, p95
        return
    # SQLite (the demo) has no percentile_cont: the same interpolation in Python, on a demo's rows.
    by_tier: dict[str, list[float]] = defaultdict(list)
    for tier, ms in session.execute(select(ModelCall.tier, ModelCall.latency_ms)
                                    .join(Job, Job.id == ModelCall.job_id).where(job_filter, has_latency)):
        by_tier[tier].append(float(ms or 0))
    for tier, values in by_tier.items():
        line = line_for(tier)
        line.p50_latency_ms, line.p95_latency_ms = percentile(values, 0.5), percentile(values, 0.95)


def summarize(session: Session, config: ModelConfig, *, batch_id: int | None = None,
              since: datetime | None = None, until: datetime | None = None,
              tenant_id: int | None = None) -> Summary:
    """Per-tier figures for the jobs of a batch and/or created in [since, until), or all jobs.

    Every call a job made counts, including failed, repeated and abandoned ones: they were requests
    the API saw. Each figure is a plain aggregate over the rows, so the sums can be checked in SQL."""
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
    by_status = {
        str(s.value if isinstance(s, JobStatus) else s): n
        for s, n in session.execute(select(Job.status, func.count()).where(job_filter).group_by(Job.status))
    }
    tiers = {name: TierLine(name) for name in config.tiers}

    def line_for(tier: str) -> TierLine:
        return tiers.setdefault(tier, TierLine(tier))

    for tier, n in session.execute(
        select(Job.tier, func.count()).where(job_filter, Job.tier.is_not(None)).group_by(Job.tier)
    ):
        line_for(tier or "-").jobs = n

    def count_if(cond: Any) -> Any:
        return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

    repeated = ModelCall.delivery > 1
    calls = select(
        ModelCall.tier, func.count(), func.sum(ModelCall.input_tokens), func.sum(ModelCall.output_tokens),
        func.sum(ModelCall.cost_usd), func.sum(ModelCall.cache_creation_input_tokens),
        func.sum(ModelCall.cache_read_input_tokens), count_if(ModelCall.outcome == "error"), count_if(repeated),
        func.coalesce(func.sum(case((repeated, ModelCall.cost_usd), else_=0)), 0),
        count_if(ModelCall.outcome == "abandoned"),
        func.count(func.distinct(case((ModelCall.stage == Stage.WORK, ModelCall.job_id)))),
    ).join(Job, Job.id == ModelCall.job_id).where(job_filter)
    for tier, n, tin, tout, cost, cw, cr, failed, rep, rep_cost, abandoned, worked in session.execute(
        calls.group_by(ModelCall.tier)
    ):
        line = line_for(tier)
        line.calls, line.input_tokens, line.output_tokens = n, int(tin or 0), int(tout or 0)
        line.cost_usd = Decimal(cost or 0)
        line.cache_creation_input_tokens, line.cache_read_input_tokens = int(cw or 0), int(cr or 0)
        line.failed_calls, line.repeated_calls, line.abandoned_calls = int(failed), int(rep), int(abandoned)
        line.repeated_cost_usd, line.worked = Decimal(rep_cost), int(worked)
    _latencies(session, job_filter, line_for)

    for tier, n in session.execute(
        select(RoutingDecision.from_tier, func.count()).join(Job, Job.id == RoutingDecision.job_id)
        .where(job_filter, RoutingDecision.reason_kind == "escalation").group_by(RoutingDecision.from_tier)
    ):
        line_for(tier or "-").escalations = n
    for tier, n, bad in session.execute(
        select(ValidationVerdict.tier, func.count(), count_if(ValidationVerdict.ok.is_(False)))
        .join(Job, Job.id == ValidationVerdict.job_id).where(job_filter).group_by(ValidationVerdict.tier)
    ):
        line = line_for(tier)
        line.validations, line.validation_failures = n, int(bad)

    escalations = session.scalar(select(func.coalesce(func.sum(Job.escalations), 0)).where(job_filter)) or 0
    failures = sum(t.validation_failures for t in tiers.values())

    # What the top tier would have cost: each job's last successful work call, same tokens, the
    # top tier's prices. No triage and no format checks in that world.
    top = config.tier(config.top_tier)
    last_work = (
        select(ModelCall.job_id, func.max(ModelCall.id).label("id"))
        .join(Job, Job.id == ModelCall.job_id)
        .where(job_filter, ModelCall.stage == Stage.WORK, ModelCall.outcome == "ok")
        .group_by(ModelCall.job_id).subquery()
    )
    tin, tout = session.execute(
        select(func.coalesce(func.sum(ModelCall.input_tokens), 0), func.coalesce(func.sum(ModelCall.output_tokens), 0))
        .join(last_work, and_(last_work.c.id == ModelCall.id))
    ).one()
    top_cost = (Decimal(tin) * top.input_per_mtok + Decimal(tout) * top.output_per_mtok) / MILLION

    total = sum((t.cost_usd for t in tiers.values()), Decimal(0))
    order = {name: i for i, name in enumerate([config.triage_tier, *config.work_tiers])}
    lines = sorted(tiers.values(), key=lambda t: order.get(t.tier, 99))
    return Summary(
        jobs=sum(by_status.values()), by_status=by_status, tiers=lines, escalations=int(escalations),
        validation_failures=int(failures), cost_usd=total, top_tier=config.top_tier, top_tier_cost_usd=top_cost,
    )


def terminal_count(session: Session, *, batch_id: int) -> tuple[int, int]:
    """(terminal jobs, all jobs) in a batch."""
    done = case((Job.status.in_([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]), 1), else_=0)
    row = session.execute(select(func.coalesce(func.sum(done), 0), func.count()).where(Job.batch_id == batch_id)).one()
    return int(row[0]), int(row[1])
