"""The routing math: per-tier jobs, calls, tokens and cost, and the saving against sending every
job to the top tier. Read straight from the rows, so anyone can check it with SQL."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import ColumnElement, and_, case, func, select, true
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.models import Job, JobStatus, ModelCall, Stage, ValidationVerdict
from pipeline.pricing import MILLION


@dataclass
class TierLine:
    tier: str
    jobs: int = 0  # jobs that finished at this tier
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)


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


def summarize(session: Session, config: ModelConfig, *, batch_id: int | None = None) -> Summary:
    job_filter: ColumnElement[bool] = Job.batch_id == batch_id if batch_id is not None else true()
    by_status = {
        str(s.value if isinstance(s, JobStatus) else s): n
        for s, n in session.execute(select(Job.status, func.count()).where(job_filter).group_by(Job.status))
    }
    tiers = {name: TierLine(name) for name in config.tiers}
    for tier, n in session.execute(
        select(Job.tier, func.count()).where(job_filter, Job.tier.is_not(None)).group_by(Job.tier)
    ):
        if tier is not None:
            tiers.setdefault(tier, TierLine(tier)).jobs = n
    calls = select(ModelCall.tier, func.count(), func.sum(ModelCall.input_tokens), func.sum(ModelCall.output_tokens),
                   func.sum(ModelCall.cost_usd)).join(Job, Job.id == ModelCall.job_id).where(job_filter)
    for tier, n, tin, tout, cost in session.execute(calls.group_by(ModelCall.tier)):
        line = tiers.setdefault(tier, TierLine(tier))
        line.calls, line.input_tokens, line.output_tokens = n, int(tin or 0), int(tout or 0)
        line.cost_usd = Decimal(cost or 0)

    escalations = session.scalar(select(func.coalesce(func.sum(Job.escalations), 0)).where(job_filter)) or 0
    failures = session.scalar(
        select(func.count()).select_from(ValidationVerdict).join(Job, Job.id == ValidationVerdict.job_id)
        .where(job_filter, ValidationVerdict.ok.is_(False))
    ) or 0

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
