"""What the dashboard's pages read, each behind one small function so a page never writes SQL.

Every figure comes from the queries the CLI and the API already use: pipeline.queries.ops for the
queues and workers, .rollups for the charts, today's cost and the recent rates (per batch, tier and
minute, folded by the dispatcher every few seconds: a few rows per batch and minute whatever the
batches' sizes), .report for per-tier stats, .history for batches, jobs and stories, .quality for
shadow evaluation. ``scope`` is the caller's (pipeline.tenants.Caller.scope): a tenant id, or None for an
operator, who sees every tenant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.models import Batch, Job, JobStatus, RollupMinute, ShadowEvaluation, utcnow
from pipeline.queries import history, ops, report, rollups
from pipeline.queries.quality import Quality, quality

RECENT = timedelta(minutes=5)  # the window of "recent rate": ETAs and throughput per tier


@dataclass
class Series:
    """Values per tier at evenly spaced instants: what a uPlot chart takes (x, then one row a tier)."""

    step_s: int
    x: list[int]  # bucket starts, unix seconds
    tiers: dict[str, list[float]] = field(default_factory=dict)

    def as_json(self, palette: list[str]) -> dict[str, Any]:
        """``palette``: every tier in a fixed order, so that a tier has the same colour in every chart."""
        return {"step_s": self.step_s, "x": self.x, "tiers": self.tiers,
                "colors": {t: palette.index(t) if t in palette else len(palette) for t in self.tiers}}


def _series(points: list[rollups.MinutePoint], value: Callable[[rollups.MinutePoint], float], *, since: datetime,
            now: datetime, step_s: int, tiers: list[str]) -> Series:
    """The rollups' minutes summed into buckets of ``step_s`` (whole minutes), one row per tier."""
    start = int(since.timestamp())
    x = list(range(start - start % step_s, int(now.timestamp()) + 1, step_s))
    out = Series(step_s=step_s, x=x, tiers={t: [0.0] * len(x) for t in tiers})
    for p in points:
        i = (int(p.minute.timestamp()) - x[0]) // step_s
        if p.tier in out.tiers and 0 <= i < len(x):
            out.tiers[p.tier][i] += value(p)
    return out


def _points(session: Session, *, scope: int | None, since: datetime, now: datetime,
            batch_id: int | None) -> list[rollups.MinutePoint]:
    if batch_id is None:
        return rollups.per_minute(session, hours=(now - since).total_seconds() / 3600, tenant_id=scope, now=now)
    return batch_minutes(session, batch_id)


def batch_minutes(session: Session, batch_id: int) -> list[rollups.MinutePoint]:
    """One batch's minutes, as ``rollups.per_minute`` reads every batch's (a batch is visible to
    the caller: the page has looked it up in the caller's scope)."""
    m = RollupMinute
    rows = session.execute(
        select(m.minute, m.tier, func.sum(m.jobs_succeeded + m.jobs_failed + m.jobs_cancelled),
               func.sum(m.jobs_succeeded), func.sum(m.calls), func.sum(m.cost_usd))
        .where(m.batch_id == batch_id).group_by(m.minute, m.tier).order_by(m.minute, m.tier))
    return [rollups.MinutePoint(t, tier, int(j), int(ok), int(c), Decimal(cost)) for t, tier, j, ok, c, cost in rows]


def throughput_series(session: Session, models: ModelConfig, *, scope: int | None, since: datetime,
                      step_s: int, batch_id: int | None = None, now: datetime | None = None) -> Series:
    """Jobs that ended (succeeded, failed or cancelled) per bucket, by the work tier they ended at."""
    now = now or utcnow()
    points = _points(session, scope=scope, since=since, now=now, batch_id=batch_id)
    return _series(points, lambda p: p.jobs, since=since, now=now, step_s=step_s, tiers=list(models.work_tiers))


def cost_series(session: Session, models: ModelConfig, *, scope: int | None, since: datetime, step_s: int,
                batch_id: int | None = None, now: datetime | None = None) -> Series:
    """The jobs' calls' cost per bucket, by the tier called (triage included; shadow evaluation,
    which `switchyard quality` reports, not)."""
    now = now or utcnow()
    points = _points(session, scope=scope, since=since, now=now, batch_id=batch_id)
    return _series(points, lambda p: float(p.cost_usd), since=since, now=now, step_s=step_s,
                   tiers=list(models.tiers))


# -- overview --------------------------------------------------------------------------------------


@dataclass
class TierNow:
    tier: str
    queue: ops.QueueStatus
    finished_5m: int  # jobs that ended at this tier in the last 5 minutes
    rpm: int
    requests_left: float | None
    itpm: int
    input_tokens_left: float | None
    otpm: int
    output_tokens_left: float | None
    paused_s: float

    @staticmethod
    def _headroom(left: float | None, limit: int) -> float | None:
        return None if not limit or left is None else max(0.0, min(1.0, left / limit))

    @property
    def headroom(self) -> float | None:
        """The smallest share left of the tier's per-minute budgets (None: no limit configured, or
        no call yet in the window)."""
        shares = [h for h in (self._headroom(self.requests_left, self.rpm),
                              self._headroom(self.input_tokens_left, self.itpm),
                              self._headroom(self.output_tokens_left, self.otpm)) if h is not None]
        return min(shares) if shares else None


@dataclass
class Overview:
    status: ops.Status
    tiers: list[TierNow]
    today: rollups.CostToday  # calls since 00:00 UTC; the top-tier price of the jobs that ended today


def finished_by_tier(session: Session, *, scope: int | None, now: datetime) -> dict[str, int]:
    """Jobs that ended per tier in the last RECENT, by whole minutes, from the rollups."""
    points = rollups.per_minute(session, hours=RECENT.total_seconds() / 3600, tenant_id=scope, now=now)
    out: dict[str, int] = {}
    for p in points:
        out[p.tier] = out.get(p.tier, 0) + p.jobs
    return out


def overview(session: Session, broker: redis.Redis, models: ModelConfig, limiter: ops.RateLevels, *,
             scope: int | None) -> Overview:
    st = ops.gather(broker, session, models, limiter)
    recent = finished_by_tier(session, scope=scope, now=utcnow())
    tiers = []
    for q in st.queues:
        tier = models.queue_tier(q.queue)
        lim = st.limits.get(tier, {})
        tiers.append(TierNow(
            tier=tier, queue=q, finished_5m=recent.get(q.queue, 0) if q.queue in models.work_tiers else 0,
            rpm=int(lim.get("rpm") or 0), requests_left=lim.get("requests_left"),
            itpm=int(lim.get("itpm") or 0), input_tokens_left=lim.get("input_tokens_left"),
            otpm=int(lim.get("otpm") or 0), output_tokens_left=lim.get("output_tokens_left"),
            paused_s=float(lim.get("paused_s") or 0)))
    return Overview(status=st, tiers=tiers, today=rollups.cost_today(session, models, tenant_id=scope))


# -- batches ---------------------------------------------------------------------------------------


@dataclass
class BatchRow:
    summary: history.BatchSummary
    finished_recently: int  # jobs of the batch that ended in the last RECENT

    @property
    def rate_per_s(self) -> float:
        return self.finished_recently / RECENT.total_seconds()

    @property
    def eta_s(self) -> float | None:
        """At the recent rate, the seconds until every job has ended (None: no recent progress)."""
        left = self.summary.jobs - self.summary.done
        if left == 0 or self.summary.cancelled_at is not None:
            return 0.0
        return left / self.rate_per_s if self.rate_per_s else None


def recent_done(session: Session, batch_ids: list[int]) -> dict[int, int]:
    """Jobs of each batch that ended in the last RECENT, by whole minutes, from the rollups: a few
    rows per batch, whatever its size."""
    if not batch_ids:
        return {}
    m = RollupMinute
    rows = session.execute(select(m.batch_id, func.sum(m.jobs_succeeded + m.jobs_failed + m.jobs_cancelled))
                           .where(m.batch_id.in_(batch_ids), m.minute >= utcnow() - RECENT).group_by(m.batch_id))
    return {int(b): int(n or 0) for b, n in rows}


def batches(session: Session, *, scope: int | None, limit: int = 50) -> list[BatchRow]:
    summaries = history.list_batches(db_session=session, limit=limit, tenant_id=scope)
    recent = recent_done(session, [b.id for b in summaries])
    return [BatchRow(b, recent.get(b.id, 0)) for b in summaries]


@dataclass
class BatchPage:
    row: BatchRow
    stats: report.Summary
    failed: list[history.JobSummary]
    failed_more: bool
    quality: Quality | None


def batch(session: Session, models: ModelConfig, batch_id: int, *, scope: int | None) -> BatchPage:
    summary = history.get_batch(db_session=session, batch=batch_id, tenant_id=scope)  # NotFound when not visible
    row = BatchRow(summary, recent_done(session, [summary.id]).get(summary.id, 0))
    stats = report.summarize(session, models, batch_id=summary.id)
    failed = history.list_jobs(db_session=session, limit=20, filters=history.JobFilters(
        batch=summary.id, status=(JobStatus.FAILED,), tenant_id=scope))
    shadowed = session.scalar(select(func.count()).select_from(ShadowEvaluation)
                              .where(ShadowEvaluation.job_id.in_(select(Job.id).where(Job.batch_id == summary.id))))
    q = quality(session, models, batch_id=summary.id) if shadowed else None
    return BatchPage(row=row, stats=stats, failed=failed.jobs, failed_more=failed.next_cursor is not None, quality=q)


def batch_since(session: Session, batch_id: int) -> datetime:
    created = session.scalar(select(Batch.created_at).where(Batch.id == batch_id))
    return created or utcnow()


def money(value: Decimal | None) -> str:
    """Dollars: to the cent from $1, and to a hundredth of a cent below (a job costs fractions of one)."""
    if value is None:
        return "-"
    sign = "-" if value < 0 else ""
    value = abs(value)
    return f"{sign}${value:.4f}" if value and value < 1 else f"{sign}${value:,.2f}"
