"""The rollups equal the raw records after a fault-matrix run: workers killed mid-call (abandoned
and repeated calls), and 429s, 500s and malformed answers from the fake (failed calls, retries,
escalations). Real worker processes and dispatcher (which folds every half second), Postgres,
Redis and the fake Claude over HTTP. Then `switchyard db rebuild-rollups` builds them again from
the raw rows, while the pipeline runs, and they are checked once more."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude
from pipeline.models import LATENCY_BUCKETS, UNROLLED_JOBS
from pipeline.queries import rollups
from pipeline.queries.report import summarize
from tests.cluster import Cluster, wait_for_batch
from tests.faults.conftest import enqueue_mixed, wait_for
from tests.faults.test_workers import calls_in_flight, worker_of
from tests.history.helpers import switchyard_json

pytestmark = pytest.mark.faults

EVER = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


def folded(sessions: sessionmaker[Session], batch_id: int) -> bool:
    """Every ended job and every finished call of the batch is in the rollups."""
    with sessions() as s:
        return not s.scalar(text(
            f"SELECT (SELECT count(*) FROM jobs WHERE {UNROLLED_JOBS} AND batch_id = :b) + "
            "(SELECT count(*) FROM model_calls c JOIN jobs j ON j.id = c.job_id WHERE NOT c.rolled_up "
            "AND c.outcome IN ('ok', 'error') AND j.batch_id = :b)"), {"b": batch_id})


def check_rollups(sessions: sessionmaker[Session], models: ModelConfig, batch_id: int) -> dict[str, int]:
    """Stats from the rollups equal stats from the raw rows, figure by figure; the latency
    histograms equal the raw latencies bucketed; the per-minute rows add up to the totals. Returns
    the raw figures the run produced, for the caller to see what it exercised."""
    with sessions() as s:
        rolled = summarize(s, models, batch_id=batch_id)
        raw = summarize(s, models, batch_id=batch_id, since=EVER[0], until=EVER[1])  # a window: the raw path
        latencies: dict[str, list[float]] = {}
        for tier, ms in s.execute(text(
                "SELECT c.tier, c.latency_ms FROM model_calls c JOIN jobs j ON j.id = c.job_id WHERE j.batch_id = :b "
                "AND c.stage NOT IN ('shadow', 'judge') AND c.latency_ms IS NOT NULL"), {"b": batch_id}):
            latencies.setdefault(tier, []).append(ms)
        totals = dict(s.execute(text(
            "SELECT tier, latency_histogram FROM rollup_totals WHERE batch_id = :b"), {"b": batch_id}).tuples().all())
        minutes = dict(s.execute(text(
            "SELECT tier, array_agg(v ORDER BY i) FROM (SELECT tier, i, sum(v) AS v FROM rollup_minutes, "
            "unnest(latency_histogram) WITH ORDINALITY u(v, i) WHERE batch_id = :b GROUP BY 1, 2) x GROUP BY 1"),
            {"b": batch_id}).tuples().all())
        sums = s.execute(text(
            "SELECT (SELECT sum(calls) FROM rollup_totals WHERE batch_id = :b), "
            "(SELECT sum(calls) FROM rollup_minutes WHERE batch_id = :b), "
            "(SELECT sum(cost_usd) FROM rollup_totals WHERE batch_id = :b), "
            "(SELECT sum(cost_usd) FROM rollup_minutes WHERE batch_id = :b)"), {"b": batch_id}).one()
    assert sums[0] == sums[1] and sums[2] == sums[3], sums
    assert (rolled.jobs, rolled.by_status, rolled.escalations, rolled.validation_failures, rolled.cost_usd,
            rolled.top_tier_cost_usd, rolled.failure_reasons) == (
        raw.jobs, raw.by_status, raw.escalations, raw.validation_failures, raw.cost_usd, raw.top_tier_cost_usd,
        raw.failure_reasons)
    rolled_tiers = {t.tier: t for t in rolled.tiers if t.calls or t.jobs}
    raw_tiers = {t.tier: t for t in raw.tiers if t.calls or t.jobs}
    assert rolled_tiers.keys() == raw_tiers.keys()
    for tier, line in rolled_tiers.items():
        want = raw_tiers[tier]
        # Every figure exactly, but the percentiles: the histogram's, within the bucket error.
        assert dataclasses.replace(line, p50_latency_ms=None, p95_latency_ms=None) == dataclasses.replace(
            want, p50_latency_ms=None, p95_latency_ms=None), tier
        hist = rollups.histogram(latencies.get(tier, []))
        # Abandoned calls have no latency, so every latency is in a folded call's bucket.
        assert list(totals.get(tier) or [0] * LATENCY_BUCKETS) == hist, tier
        assert list(minutes.get(tier) or [0] * LATENCY_BUCKETS) == hist, tier
        assert (line.p50_latency_ms, line.p95_latency_ms) == (rollups.percentile(hist, 0.5),
                                                              rollups.percentile(hist, 0.95)), tier
    return {"calls": sum(t.calls for t in raw.tiers), "failed": sum(t.failed_calls for t in raw.tiers),
            "repeated": sum(t.repeated_calls for t in raw.tiers),
            "abandoned": sum(t.abandoned_calls for t in raw.tiers), "escalations": raw.escalations}


def test_rollups_equal_the_raw_figures_after_kills_and_faults(
        make_fake: Callable[..., FakeClaude], make_cluster: Callable[..., Cluster], sessions: sessionmaker[Session],
        models: ModelConfig, tmp_path: Path, database_url: str) -> None:
    fake = make_fake(latency_ms=150, latency_jitter_ms=150, fault_rate=0.15, faults=("429", "500", "malformed"),
                     seed=17, retry_after_s=0.5)
    cluster = make_cluster(fake, env={"SWITCHYARD_ROLLUP_INTERVAL_S": "0.5"})
    batch_id = enqueue_mixed(sessions, models, tmp_path, "rollups", size=120)
    # A worker killed mid-call: its calls are abandoned, and made again by the next delivery.
    for tier in ("sonnet", "triage"):
        wait_for(lambda tier=tier: len(calls_in_flight(sessions, batch_id, tier)) >= 2, timeout=120,
                 what=f"calls in flight on {tier}")
        victim = worker_of(cluster, tier)
        victim.signal(signal.SIGKILL)
        victim.popen.wait(10)
        cluster.restart(victim, wait_ready=False)
    wait_for_batch(sessions, batch_id, timeout=240, cluster=cluster)
    wait_for(lambda: folded(sessions, batch_id), timeout=60, what="the dispatcher to fold the batch",
             interval=0.2)
    seen = check_rollups(sessions, models, batch_id)
    # The run exercised what the rollups must get right.
    assert seen["abandoned"] >= 2 and seen["repeated"] >= 2 and seen["failed"] >= 1, seen

    # Rebuilt from the raw rows, with the dispatcher still folding: the same figures.
    done = switchyard_json(database_url, "db", "rebuild-rollups")
    assert done["calls"] >= seen["calls"] - seen["abandoned"]
    wait_for(lambda: folded(sessions, batch_id), timeout=60, what="the rebuild to fold the batch", interval=0.2)
    assert check_rollups(sessions, models, batch_id) == seen
