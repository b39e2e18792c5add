"""report.summarize on rows a factory builds: repeated and abandoned calls are counted, and the
latency percentiles agree between Postgres (percentile_cont) and SQLite (computed in Python)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pipeline import migrate
from pipeline.config import ModelConfig
from pipeline.db import make_engine
from pipeline.models import Batch, Job, JobKind, JobStatus, ModelCall, RoutingDecision, Stage, ValidationVerdict
from pipeline.report import percentile, summarize

LATENCIES = [120.0, 80.0, 300.0, 95.0, 410.0, 150.0, 99.0]


def build(session: Session, *, interleaved: bool = False) -> tuple[int, int]:
    """Two batches; the first has a job whose work stage was delivered twice (a repeated call and
    an abandoned one) and an escalation. Returns the batch ids. ``interleaved`` gives the second
    batch's job an id between the first batch's two, as concurrent enqueues do: the first batch's
    id range then holds a job that is not its own."""
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    a, b = Batch(name="stats-a", created_at=t0), Batch(name="stats-b", created_at=t0)
    session.add_all([a, b])
    session.flush()
    j1 = Job(batch_id=a.id, key="j1", kind=JobKind.CLASSIFY, payload={}, status=JobStatus.SUCCEEDED, tier="opus",
             escalations=1, created_at=t0)
    j2 = Job(batch_id=a.id, key="j2", kind=JobKind.GENERATE, payload={}, status=JobStatus.FAILED, tier="sonnet",
             created_at=t0 + timedelta(days=2))
    j3 = Job(batch_id=b.id, key="j3", kind=JobKind.GENERATE, payload={}, status=JobStatus.SUCCEEDED, tier="sonnet",
             created_at=t0)
    for job in [j1, j3, j2] if interleaved else [j1, j2, j3]:
        session.add(job)
        session.flush()

    def call(job: Job, tier: str, ms: float | None, *, stage: Stage = Stage.WORK, delivery: int = 1,
             outcome: str = "ok", cost: str = "0.01", tokens: tuple[int, int] = (100, 10)) -> ModelCall:
        return ModelCall(job_id=job.id, stage=stage, tier=tier, model=f"m-{tier}", attempt=1, delivery=delivery,
                         outcome=outcome, input_tokens=tokens[0], output_tokens=tokens[1],
                         cache_creation_input_tokens=0, cache_read_input_tokens=0, cost_usd=Decimal(cost),
                         latency_ms=ms, started_at=t0)

    session.add_all([
        call(j1, "haiku", LATENCIES[0], stage=Stage.TRIAGE, cost="0.001"),
        call(j1, "sonnet", None, delivery=1, outcome="abandoned", cost="0"),
        call(j1, "sonnet", LATENCIES[1], delivery=2),
        call(j1, "sonnet", LATENCIES[2]),
        call(j1, "opus", LATENCIES[3], cost="0.05", tokens=(700, 70)),
        call(j2, "haiku", LATENCIES[4], stage=Stage.TRIAGE, cost="0.001"),
        call(j2, "sonnet", LATENCIES[5], outcome="error", cost="0"),
        call(j3, "sonnet", LATENCIES[6]),
        RoutingDecision(job_id=j1.id, reason_kind="escalation", from_tier="sonnet", to_tier="opus", created_at=t0),
        ValidationVerdict(job_id=j1.id, tier="sonnet", attempt=1, validator="label", ok=False, problems=["x"],
                          created_at=t0),
        ValidationVerdict(job_id=j1.id, tier="opus", attempt=1, validator="label", ok=True, problems=[],
                          created_at=t0),
    ])
    session.flush()
    return a.id, b.id


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'stats.sqlite'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _check(session: Session, models: ModelConfig, *, interleaved: bool) -> None:
    a, _b = build(session, interleaved=interleaved)
    s = summarize(session, models, batch_id=a)
    tiers = {t.tier: t for t in s.tiers}
    assert s.jobs == 2
    assert s.by_status == {"succeeded": 1, "failed": 1}
    sonnet = tiers["sonnet"]
    assert (sonnet.calls, sonnet.repeated_calls, sonnet.abandoned_calls, sonnet.failed_calls) == (4, 1, 1, 1)
    assert sonnet.repeated_cost_usd == Decimal("0.01")
    assert sonnet.worked == 2
    assert sonnet.escalations == 1
    assert sonnet.escalation_rate == pytest.approx(0.5)
    assert (sonnet.validations, sonnet.validation_failures, sonnet.validation_failure_rate) == (1, 1, 1.0)
    assert tiers["opus"].validation_failure_rate == 0.0
    sonnet_ms = [LATENCIES[1], LATENCIES[2], LATENCIES[5]]
    assert sonnet.p50_latency_ms == pytest.approx(percentile(sonnet_ms, 0.5)) == pytest.approx(150.0)
    assert sonnet.p95_latency_ms == pytest.approx(percentile(sonnet_ms, 0.95))
    assert tiers["haiku"].p50_latency_ms == pytest.approx((LATENCIES[0] + LATENCIES[4]) / 2)
    assert s.cost_usd == Decimal("0.072")
    assert s.escalations == 1
    # The top-tier comparison prices each job's last successful work call: j1's opus call (j2's
    # only work call failed), not its earlier sonnet ones.
    top = models.tier(models.top_tier)
    assert s.top_tier_cost_usd == (700 * top.input_per_mtok + 70 * top.output_per_mtok) / 1_000_000
    # A time window (the shared test database holds other tests' jobs, all created in real time):
    # only j2 was created two days after the others.
    late = summarize(session, models, since=datetime(2026, 3, 2, tzinfo=UTC), until=datetime(2026, 3, 9, tzinfo=UTC))
    assert late.jobs == 1
    assert sum(t.calls for t in late.tiers) == 2
    march = summarize(session, models, since=datetime(2026, 3, 1, tzinfo=UTC), until=datetime(2026, 4, 1, tzinfo=UTC))
    assert march.jobs == 3


@pytest.mark.parametrize("interleaved", [False, True], ids=["batch-alone-in-its-ids", "ids-interleaved"])
def test_summary_on_postgres(db: Session, models: ModelConfig, interleaved: bool) -> None:
    _check(db, models, interleaved=interleaved)


@pytest.mark.parametrize("interleaved", [False, True], ids=["batch-alone-in-its-ids", "ids-interleaved"])
def test_summary_on_sqlite_computes_percentiles_in_python(sqlite_engine: Engine, models: ModelConfig,
                                                          interleaved: bool) -> None:
    with Session(sqlite_engine) as session:
        _check(session, models, interleaved=interleaved)


def test_percentile_interpolates_like_percentile_cont() -> None:
    assert percentile([], 0.5) is None
    assert percentile([5.0], 0.95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile(list(map(float, range(1, 101))), 0.95) == pytest.approx(95.05)
