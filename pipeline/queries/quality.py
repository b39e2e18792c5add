"""What routing costs in quality, from shadow evaluation (pipeline.flow.shadow): per stratum (the
tier a job ended at, and triage's difficulty) the succeeded jobs, the shadowed ones, their agreement
with the reference tier and its 95% Wilson interval, and the cost per job; over all of them the
stratified estimate of agreement (pipeline.quality.estimate), the cost against sending every job to
the reference tier, and what the evaluation itself cost. Read straight from the rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import ModelConfig
from pipeline.errors import NotFound
from pipeline.models import (
    EVALUATION_STAGES,
    OPEN_SHADOW,
    Job,
    JobStatus,
    ModelCall,
    ShadowEvaluation,
    ShadowStatus,
    Stage,
    Task,
)
from pipeline.names import quoted
from pipeline.quality.estimate import Interval, Stratum, stratified, wilson
from pipeline.queries.report import _job_filter

# A pinned job skips triage: it has no difficulty, and is a stratum of its own.
PINNED = "pinned"


@dataclass
class Line:
    """One stratum, or one tier over its difficulties (``difficulty`` None)."""

    tier: str
    difficulty: str | None
    jobs: int = 0  # succeeded
    shadowed: int = 0  # sampled, whatever became of the shadow
    evaluated: int = 0  # with an agreement recorded
    agreed: int = 0
    failed: int = 0  # the shadow's call failed, or the reference failed the job's checks
    open: int = 0  # still on its way
    score_sum: float = 0.0  # for extract, the share of fields equal; else 1 or 0
    cost_usd: Decimal = Decimal(0)
    reference: bool = False  # the reference tier itself: agreement 1 by definition, never shadowed

    @property
    def agreement(self) -> float | None:
        if self.reference:
            return 1.0
        return self.agreed / self.evaluated if self.evaluated else None

    @property
    def interval(self) -> Interval | None:
        if self.reference:
            return Interval(1.0, 1.0)
        return wilson(self.agreed, self.evaluated)

    @property
    def mean_score(self) -> float | None:
        return self.score_sum / self.evaluated if self.evaluated else None

    @property
    def cost_per_job(self) -> Decimal | None:
        return self.cost_usd / self.jobs if self.jobs else None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "score_sum"}
        interval = self.interval
        out.update(cost_usd=f"{self.cost_usd:f}", agreement=self.agreement, mean_score=self.mean_score,
                   agreement_low=interval.low if interval else None,
                   agreement_high=interval.high if interval else None,
                   cost_per_job_usd=f"{self.cost_per_job:f}" if self.cost_per_job is not None else None)
        return out


@dataclass
class Quality:
    reference_tier: str
    jobs: int  # every job selected, whatever its status
    succeeded: int
    strata: list[Line]
    tiers: list[Line]
    cost_usd: Decimal  # the jobs' own cost
    reference_cost_usd: Decimal  # had every job been answered by the reference tier
    evaluation_cost_usd: Decimal  # shadow and judge calls
    agreement: float | None = None
    agreement_low: float | None = None
    agreement_high: float | None = None
    coverage: float | None = None  # the share of succeeded jobs in strata the estimate covers
    notes: list[str] = field(default_factory=list)

    @property
    def shadowed(self) -> int:
        return sum(s.shadowed for s in self.strata)

    @property
    def evaluated(self) -> int:
        return sum(s.evaluated for s in self.strata)

    def to_dict(self) -> dict[str, Any]:
        saving = self.reference_cost_usd - self.cost_usd
        return {
            "reference_tier": self.reference_tier, "jobs": self.jobs, "succeeded": self.succeeded,
            "shadowed": self.shadowed, "evaluated": self.evaluated, "agreement": self.agreement,
            "agreement_low": self.agreement_low, "agreement_high": self.agreement_high, "coverage": self.coverage,
            "cost_usd": f"{self.cost_usd:f}", "reference_cost_usd": f"{self.reference_cost_usd:f}",
            "saving_usd": f"{saving:f}",
            "saving_ratio": float(saving / self.reference_cost_usd) if self.reference_cost_usd else 0.0,
            "evaluation_cost_usd": f"{self.evaluation_cost_usd:f}",
            "strata": [s.to_dict() for s in self.strata], "tiers": [t.to_dict() for t in self.tiers],
            "notes": self.notes,
        }


def task_ids(session: Session, name: str, *, tenant_id: int | None) -> list[int]:
    """Every version of the task ``name`` of this tenant (None: the operator's); NotFound if none."""
    scope = Task.tenant_id.is_(None) if tenant_id is None else Task.tenant_id == tenant_id
    ids = list(session.scalars(select(Task.id).where(Task.name == name, scope)))
    if not ids:
        raise NotFound(f"no task named {quoted(name)}: `switchyard tasks list` shows them")
    return ids


def quality(session: Session, config: ModelConfig, *, batch_id: int | None = None, task: str | None = None,
            since: datetime | None = None, until: datetime | None = None,
            tenant_id: int | None = None) -> Quality:
    """The figures for the jobs of a batch, of a task, created in [since, until), of a tenant, or all."""
    job_filter = _job_filter(batch_id=batch_id, since=since, until=until, tenant_id=tenant_id)
    if task is not None:
        job_filter = and_(job_filter, Job.task_id.in_(task_ids(session, task, tenant_id=tenant_id)))
    reference = config.routing.reference
    sh = ShadowEvaluation
    done = sh.status == ShadowStatus.DONE
    rows = session.execute(
        select(Job.tier, Job.difficulty, func.count(), func.coalesce(func.sum(Job.cost_usd), 0), func.count(sh.id),
               func.count().filter(done), func.count().filter(and_(done, sh.agreed.is_(True))),
               func.count().filter(sh.status == ShadowStatus.FAILED), func.count().filter(sh.status.in_(OPEN_SHADOW)),
               func.coalesce(func.sum(sh.agreement).filter(done), 0.0))
        .outerjoin(sh, sh.job_id == Job.id)
        .where(job_filter, Job.status == JobStatus.SUCCEEDED)
        .group_by(Job.tier, Job.difficulty)
    ).all()
    strata: list[Line] = []
    tiers: dict[str, Line] = {}
    for tier, difficulty, n, cost, shadowed, evaluated, agreed, failed, open_, scores in rows:
        tier = tier or "-"
        line = Line(tier, difficulty or PINNED, jobs=n, shadowed=shadowed, evaluated=evaluated, agreed=agreed,
                    failed=failed, open=open_, score_sum=float(scores or 0), cost_usd=Decimal(cost),
                    reference=tier == reference)
        strata.append(line)
        whole = tiers.setdefault(tier, Line(tier, None, reference=tier == reference))
        for name in ("jobs", "shadowed", "evaluated", "agreed", "failed", "open", "score_sum", "cost_usd"):
            setattr(whole, name, getattr(whole, name) + getattr(line, name))
    order = {name: i for i, name in enumerate(config.work_tiers)}
    strata.sort(key=lambda s: (order.get(s.tier, 99), s.tier, s.difficulty or ""))

    jobs, cost = session.execute(select(func.count(), func.coalesce(func.sum(Job.cost_usd), 0))
                                 .where(job_filter)).one()
    evaluation_cost = session.scalar(
        select(func.coalesce(func.sum(ModelCall.cost_usd), 0))
        .where(ModelCall.stage.in_([s.value for s in EVALUATION_STAGES]),
               ModelCall.job_id.in_(select(Job.id).where(job_filter)))) or 0
    out = Quality(reference_tier=reference, jobs=int(jobs), succeeded=sum(s.jobs for s in strata), strata=strata,
                  tiers=sorted(tiers.values(), key=lambda t: (order.get(t.tier, 99), t.tier)),
                  cost_usd=Decimal(cost), reference_cost_usd=_reference_cost(session, config, job_filter),
                  evaluation_cost_usd=Decimal(evaluation_cost))
    estimate = stratified([Stratum(s.jobs, s.evaluated, s.agreed, exact=s.reference) for s in strata])
    if estimate is not None:
        out.agreement, out.coverage = estimate.agreement, estimate.coverage
        out.agreement_low, out.agreement_high = estimate.interval.low, estimate.interval.high
    out.notes = _notes(out)
    return out


def _notes(q: Quality) -> list[str]:
    notes: list[str] = []
    if q.succeeded == 0:
        return ["no job has succeeded yet: there is nothing to compare"]
    at_reference = sum(s.jobs for s in q.strata if s.reference)
    if at_reference:
        notes.append(f"{at_reference:,} job(s) ended at the reference tier {q.reference_tier}: they are not shadowed, "
                     f"and count as agreeing (agreement 1 by definition)")
    if q.evaluated == 0:
        pending = sum(s.open for s in q.strata)
        why = (f"{pending:,} shadow(s) still on their way" if pending else
               "set shadow_rate (configuration [routing], enqueue --shadow-rate, or the task's shadow_rate) to sample")
        notes.append(f"no job below the reference tier has a shadow result yet ({why}), so agreement below it "
                     f"cannot be estimated")
    elif q.coverage is not None and q.coverage < 1:
        notes.append(f"the estimate covers {q.coverage:.0%} of the succeeded jobs: strata with no shadow result "
                     f"are left out")
    failed = sum(s.failed for s in q.strata)
    if failed:
        notes.append(f"{failed:,} shadow(s) failed (a call failed, or the reference answer failed the job's checks) "
                     f"and are left out of the estimates")
    return notes


def _reference_cost(session: Session, config: ModelConfig, job_filter: Any) -> Decimal:
    """What the jobs would have cost at the reference tier: each job's last successful work call,
    its tokens at the reference tier's prices (as stats prices "every job at the top tier")."""
    last = (select(func.max(ModelCall.id).label("id"))
            .where(ModelCall.stage == Stage.WORK, ModelCall.outcome == "ok",
                   ModelCall.job_id.in_(select(Job.id).where(job_filter)))
            .group_by(ModelCall.job_id).subquery())
    tokens = session.execute(
        select(*(func.coalesce(func.sum(c), 0) for c in (ModelCall.input_tokens, ModelCall.output_tokens,
                                                          ModelCall.cache_creation_input_tokens,
                                                          ModelCall.cache_read_input_tokens)))
        .join_from(ModelCall, last, last.c.id == ModelCall.id)).one()
    return call_cost(config.tier(config.routing.reference), Usage(*(int(n) for n in tokens)), config=config)
