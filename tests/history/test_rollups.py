"""The rollups on rows a factory builds (pipeline.queries.rollups): the latency histogram's
buckets, `batches` and the dashboard's overview read from them, and a second fold finding nothing
to add. The fault-matrix check (rollups equal the raw figures after worker kills) is in
tests/faults/test_rollups.py; stats against figures worked out by hand in test_stats.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.models import LATENCY_BUCKETS, Batch, Job, JobKind, JobStatus, ModelCall, Stage
from pipeline.queries import rollups
from pipeline.queries.history import list_batches


def test_buckets_are_log_spaced_and_agree_with_postgres(db: Session) -> None:
    assert rollups.bucket(0.2) == 0
    assert rollups.bucket(1.0) == 1
    assert rollups.bucket(1.9) == 4  # [2^(3/4), 2)
    assert rollups.bucket(2.0) == 5
    assert rollups.bucket(10 ** 9) == LATENCY_BUCKETS - 1
    values = [0.3, 1.0, 1.5, 2.0, 7.0, 99.9, 100.0, 128.0, 250.0, 4000.0, 1e6, 1e9]
    got = db.execute(text(f"SELECT {rollups.bucket_sql('v')} FROM unnest(CAST(:v AS float8[])) v"),
                     {"v": values}).scalars().all()
    assert got == [rollups.bucket(v) for v in values]
    # Every middle value is within BUCKET_ERROR of both of its bucket's bounds.
    for k in range(1, LATENCY_BUCKETS - 1):
        lo, hi, mid = rollups.BOUNDS[k - 1], rollups.BOUNDS[k], rollups.bucket_value(k)
        assert mid / lo - 1 <= rollups.BUCKET_ERROR + 1e-12
        assert 1 - mid / hi <= rollups.BUCKET_ERROR + 1e-12


def test_percentile_is_within_the_bucket_error() -> None:
    values = [float(v) for v in range(1, 5001)]
    for q in (0.5, 0.95, 0.99):
        exact = values[int(q * (len(values) - 1))]
        assert rollups.percentile(rollups.histogram(values), q) == pytest.approx(exact, rel=rollups.BUCKET_ERROR)
    assert rollups.percentile([0] * LATENCY_BUCKETS, 0.5) is None


def _batch(db: Session, name: str, now: datetime) -> tuple[int, list[int]]:
    """A batch of four jobs: two succeeded (sonnet, opus), one failed at sonnet, one queued; a
    triage and a work call each, the last work call of the sonnet job in flight."""
    b = Batch(name=name)
    db.add(b)
    db.flush()
    ids = []
    for status, tier in [(JobStatus.SUCCEEDED, "sonnet"), (JobStatus.SUCCEEDED, "opus"),
                         (JobStatus.FAILED, "sonnet"), (JobStatus.QUEUED, None)]:
        job = Job(batch_id=b.id, key=f"{name}-{len(ids)}", kind=JobKind.CLASSIFY, payload={}, status=status,
                  tier=tier, finished_at=now if status in (JobStatus.SUCCEEDED, JobStatus.FAILED) else None,
                  failure_reason="validation failed at sonnet" if status is JobStatus.FAILED else None)
        db.add(job)
        db.flush()
        ids.append(job.id)
        if tier is None:
            continue
        db.add(ModelCall(job_id=job.id, stage=Stage.TRIAGE, tier="haiku", model="h", outcome="ok", input_tokens=100,
                         output_tokens=10, cost_usd=Decimal("0.001"), latency_ms=50.0, started_at=now,
                         finished_at=now))
        db.add(ModelCall(job_id=job.id, stage=Stage.WORK, tier=tier, model="w", outcome="ok", input_tokens=200,
                         output_tokens=20, cost_usd=Decimal("0.01"), latency_ms=500.0, started_at=now,
                         finished_at=now))
    db.add(ModelCall(job_id=ids[0], stage=Stage.WORK, tier="sonnet", model="w", outcome="started",
                     started_at=now))
    db.flush()
    return b.id, ids


def test_overview_and_batches_read_the_rollups(db: Session, models: ModelConfig) -> None:
    now = datetime.now(UTC).replace(second=30, microsecond=0)
    batch_id, _ = _batch(db, "rollup-overview", now)
    before = {b.id: b for b in list_batches(db_session=db, limit=1000)}[batch_id]
    rollups.fold(db, chunk=1_000_000)
    # Folded: the same counts and cost, now from the rollups plus the call still in flight.
    after = {b.id: b for b in list_batches(db_session=db, limit=1000)}[batch_id]
    assert before.by_status == after.by_status == {"succeeded": 2, "failed": 1, "queued": 1}
    assert before.cost_usd == after.cost_usd == Decimal("0.033")
    assert db.scalar(select(ModelCall.rolled_up).where(ModelCall.outcome == "started",
                                                       ModelCall.job_id.in_(select(Job.id).where(
                                                           Job.batch_id == batch_id)))) is False
    # A second fold adds nothing: every row is folded once.
    totals = db.execute(text("SELECT tier, calls, jobs_succeeded FROM rollup_totals WHERE batch_id = :b "
                             "ORDER BY tier"), {"b": batch_id}).all()
    rollups.fold(db, chunk=1_000_000)
    assert db.execute(text("SELECT tier, calls, jobs_succeeded FROM rollup_totals WHERE batch_id = :b "
                           "ORDER BY tier"), {"b": batch_id}).all() == totals
    assert ("haiku", 3, 0) in totals

    points = [p for p in rollups.per_minute(db, hours=1, now=now + timedelta(minutes=1))
              if p.minute == now.replace(second=0)]
    by_tier = {p.tier: p for p in points}
    # Other tests' rows may share the minute: at least this batch's.
    assert by_tier["sonnet"].jobs >= 2 and by_tier["opus"].succeeded >= 1
    assert by_tier["haiku"].calls >= 3 and by_tier["haiku"].cost_usd >= Decimal("0.003")

    today = rollups.cost_today(db, models, now=now)
    tiers = {t.tier: t for t in today.tiers}
    assert tiers["sonnet"].cost_usd >= Decimal("0.02")
    assert today.cost_usd == sum((t.cost_usd for t in today.tiers), Decimal(0))
    assert today.top_tier_cost_usd > 0
    assert today.saving_usd == today.top_tier_cost_usd - today.cost_usd


def test_the_live_tail_covers_every_status_a_job_can_leave() -> None:
    """A job in a status missing from NOT_ENDED would be in neither the rollups nor the tail."""
    from pipeline.flow.states import ALLOWED
    from pipeline.models import JobStatus
    from pipeline.queries.rollups import NOT_ENDED

    leavable = {s.value for s in JobStatus if ALLOWED.get(s)}
    assert leavable == {v.strip(" '") for v in NOT_ENDED.strip("()").split(",")}
