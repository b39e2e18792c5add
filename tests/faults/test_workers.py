"""Workers die: SIGKILL mid-call in each tier, a poison job that kills its worker every time, and a
graceful SIGTERM. Real worker processes, Postgres, Redis and the fake Claude over HTTP."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude
from pipeline.models import Job, JobStatus, ModelCall, Stage
from tests.cluster import Cluster, wait_for_batch
from tests.faults.conftest import CALL_ATTEMPTS, enqueue_mixed, wait_for
from tests.faults.invariants import check_exactly_once, summary, unexpected_failures

pytestmark = pytest.mark.faults

# Each tier's queue, the status its jobs wait in, and the call its workers make.
TIERS: dict[str, tuple[JobStatus, Stage, str | None]] = {
    "triage": (JobStatus.TRIAGING, Stage.TRIAGE, None),
    "sonnet": (JobStatus.WORKING, Stage.WORK, "sonnet"),
    "opus": (JobStatus.WORKING, Stage.WORK, "opus"),
    "validate": (JobStatus.VALIDATING, Stage.FORMAT_CHECK, None),
}


def calls_in_flight(sessions: sessionmaker[Session], batch_id: int, tier: str) -> dict[int, int]:
    """Jobs whose call on ``tier`` is under way right now: job id -> the version it is at."""
    status, stage, job_tier = TIERS[tier]
    query = (select(Job.id, Job.version).join(ModelCall, ModelCall.job_id == Job.id)
             .where(Job.batch_id == batch_id, Job.status == status, Job.claimed_at.is_not(None),
                    ModelCall.stage == stage, ModelCall.outcome == "started"))
    if job_tier:
        query = query.where(Job.tier == job_tier)
    with sessions() as s:
        return dict(s.execute(query).all())


def moved_on(sessions: sessionmaker[Session], jobs: dict[int, int]) -> bool:
    with sessions() as s:
        now = dict(s.execute(select(Job.id, Job.version).where(Job.id.in_(jobs))).all())
    return all(now[j] != v for j, v in jobs.items())


def abandoned(sessions: sessionmaker[Session], jobs: dict[int, int]) -> bool:
    with sessions() as s:
        return not s.scalar(select(ModelCall.id).where(ModelCall.job_id.in_(jobs), ModelCall.outcome == "started",
                                                       ModelCall.delivery == 1).limit(1))


def worker_of(cluster: Cluster, tier: str) -> Any:
    return next(p for p in cluster.procs if p.name == f"worker-{tier}" and p.alive)


@pytest.mark.parametrize("tier", list(TIERS))
def test_sigkill_worker_mid_call(tier: str, make_fake: Callable[..., FakeClaude], make_cluster: Callable[..., Cluster],
                                 sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
                                 figures: dict[str, Any]) -> None:
    """SIGKILL the only worker of a tier while its calls are in flight; a supervisor restarts it.
    The jobs it held are swept once their claim goes stale, finish, and nothing is done twice."""
    fake = make_fake(latency_ms=150, latency_jitter_ms=150, seed=7)
    cluster = make_cluster(fake)
    batch_id = enqueue_mixed(sessions, models, tmp_path, f"kill-{tier}")

    in_flight: dict[int, int] = {}

    def busy() -> bool:
        in_flight.update(calls_in_flight(sessions, batch_id, tier))
        return len(in_flight) >= 2

    wait_for(busy, timeout=120, what=f"calls in flight on {tier}")
    victim = worker_of(cluster, tier)
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.popen.wait(10)
    # The worker is gone: whatever it still held is exactly what a kill orphans.
    orphans = calls_in_flight(sessions, batch_id, tier)
    cluster.restart(victim)
    # Detected: the sweeper closed the dead worker's calls as abandoned and republished its jobs.
    wait_for(lambda: abandoned(sessions, orphans), timeout=120, what="the sweeper to find the dead claims")
    detected_s = time.monotonic() - killed_at
    # Recovered: each of those jobs got through the stage (after waiting its turn in the queue).
    wait_for(lambda: moved_on(sessions, orphans), timeout=120, what="the killed worker's jobs to move on")
    recovery_s = time.monotonic() - killed_at

    wait_for_batch(sessions, batch_id, timeout=180, cluster=cluster)
    facts = check_exactly_once(sessions, batch_id, fake=fake, max_attempts=CALL_ATTEMPTS)
    assert not unexpected_failures(facts), unexpected_failures(facts)
    assert orphans, "the kill orphaned no call: it happened between calls"
    # The orphaned calls were closed as abandoned and made again, and both are on record.
    assert facts.abandoned_calls >= len(orphans)
    assert facts.repeated_calls >= len(orphans)
    with sessions() as s:
        redone = s.scalars(select(ModelCall.job_id).where(ModelCall.job_id.in_(orphans), ModelCall.delivery == 2))
        assert set(redone) == set(orphans)
    figures[f"kill {tier}"] = summary(facts, orphaned_calls=len(orphans), swept_after_s=round(detected_s, 1),
                                      recovered_after_s=round(recovery_s, 1))


POISON = "[crash-worker]"


def test_poison_job_fails_after_bounded_deliveries(make_fake: Callable[..., FakeClaude],
                                                  make_cluster: Callable[..., Cluster],
                                                  sessions: sessionmaker[Session], models: ModelConfig,
                                                  tmp_path: Path, figures: dict[str, Any]) -> None:
    """A job that kills its worker whenever it is worked on (SWITCHYARD_TEST_CRASH_ON: the worker
    SIGKILLs itself, as the OOM killer would) ends failed as poison after max_deliveries, while a
    supervisor keeps restarting the worker and the rest of the batch finishes."""
    fake = make_fake(latency_ms=20, latency_jitter_ms=20, seed=3)
    cluster = make_cluster(fake, env={"SWITCHYARD_TEST_CRASH_ON": POISON})
    poison = {"key": "poison", "kind": "generate", "prompt": f"Summarise this {POISON}", "tier": "sonnet"}
    batch_id = enqueue_mixed(sessions, models, tmp_path, "poison", extra=[poison])
    with cluster.supervised() as deaths:
        wait_for_batch(sessions, batch_id, timeout=240, cluster=cluster)
    facts = check_exactly_once(sessions, batch_id, fake=fake, max_attempts=CALL_ATTEMPTS)
    with sessions() as s:
        job = s.scalars(select(Job).where(Job.batch_id == batch_id, Job.key == "poison")).one()
    assert job.status is JobStatus.FAILED
    assert job.error and "poison job" in job.error and "started 3 times" in job.error
    # It took the worker down once per delivery, and no more.
    assert [name for name, _ in deaths] == ["worker-sonnet"] * 3, deaths
    assert not {k: v for k, v in unexpected_failures(facts).items() if k != "poison"}, unexpected_failures(facts)
    figures["poison job"] = summary(facts, worker_deaths=len(deaths))


def test_sigterm_hands_back_in_flight_calls(make_fake: Callable[..., FakeClaude],
                                            make_cluster: Callable[..., Cluster],
                                            sessions: sessionmaker[Session], models: ModelConfig,
                                            tmp_path: Path, figures: dict[str, Any]) -> None:
    """SIGTERM a worker with calls in flight: it finishes them before exiting (soft shutdown), so
    nothing is abandoned and nothing waits for a sweeper. The claim deadline is set beyond the test's
    patience, so only a clean hand-over can let the batch finish."""
    fake = make_fake(latency_ms=300, latency_jitter_ms=200, seed=11)
    cluster = make_cluster(fake, env={"SWITCHYARD_CLAIM_DEADLINE_S": "600", "SWITCHYARD_STAGE_DEADLINE_S": "600"})
    batch_id = enqueue_mixed(sessions, models, tmp_path, "sigterm")
    wait_for(lambda: len(calls_in_flight(sessions, batch_id, "sonnet")) >= 4, timeout=120,
             what="calls in flight on sonnet")
    victim = worker_of(cluster, "sonnet")
    victim.signal(signal.SIGTERM)
    assert victim.popen.wait(60) == 0, victim.tail()
    cluster.restart(victim)
    wait_for_batch(sessions, batch_id, timeout=180, cluster=cluster)
    facts = check_exactly_once(sessions, batch_id, fake=fake, max_attempts=CALL_ATTEMPTS)
    assert not unexpected_failures(facts), unexpected_failures(facts)
    assert facts.abandoned_calls == 0 and facts.repeated_calls == 0
    figures["sigterm"] = summary(facts)
