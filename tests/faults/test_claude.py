"""Claude misbehaves: the fake injects faults, each kind into 20% of all requests. Transient
errors are retried (bounded, honouring retry-after, never multiplied by the SDK), and a stage whose
attempts all meet one waits and tries again instead of failing its job; bad answers go through
validation and escalation; permanent errors fail the job with the API's message; every job still
ends exactly once.

Two kinds share a batch (each drawn for 20% of requests, 40% in all), so the eight kinds take
four batches; the cluster is shared by the four, and the fake is reconfigured between them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.models import Job, JobStatus, ModelCall
from tests.cluster import Cluster, wait_for_batch
from tests.faults.conftest import CALL_ATTEMPTS, FAST_ENV, enqueue_mixed
from tests.faults.invariants import check_exactly_once, check_retry_after, summary

pytestmark = pytest.mark.faults

RATE_EACH = 0.2
PAIRS = [("429", "malformed"), ("529", "empty"), ("500", "refusal"), ("stall", "drop")]
# What a call row records when a transient fault hit it.
ROW_ERROR = {"429": "rate_limit_error", "529": "overloaded_error", "500": "api_error", "stall": "timeout",
             "drop": "connection_error"}
# Jobs that hit a permanent error (a 400): they must fail at once, with the API's own message.
PERMANENT = [{"key": f"permanent-{i}", "kind": "generate", "prompt": f"Say hi {i} [fake:error=400@haiku]"}
             for i in range(3)]


def options(pair: tuple[str, str]) -> FakeOptions:
    # A stall outlives the client's 2 s timeout; a 429 asks for 1 s.
    return FakeOptions(latency_ms=10, latency_jitter_ms=20, fault_rate=RATE_EACH * len(pair), faults=pair, seed=13,
                       stall_seconds=3.0, retry_after_s=1.0)


@pytest.fixture(scope="module")
def own_database(fresh_database: Callable[[str], str]) -> str:
    """A database of this module's own: the checks below match every request the fake served to a
    row of this module's batches, so no other test's unfinished jobs may reach this cluster."""
    return fresh_database("claude_faults")


@pytest.fixture(scope="module")
def sessions(own_database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(own_database)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def shared(own_database: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[FakeClaude, Cluster]]:
    with FakeClaude(port=0) as fake:
        cluster = Cluster(database_url=own_database, broker_url=broker_url, claude_url=fake.base_url,
                          workdir=tmp_path_factory.mktemp("claude-faults"), env_extra=dict(FAST_ENV))
        cluster.start_all(concurrency=16)
        try:
            yield fake, cluster
        finally:
            cluster.stop()


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_claude_misbehaves(pair: tuple[str, str], shared: tuple[FakeClaude, Cluster],
                           sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
                           figures: dict[str, Any]) -> None:
    fake, cluster = shared
    fake.reconfigure(options(pair))
    batch_id = enqueue_mixed(sessions, models, tmp_path, f"claude-{'-'.join(pair)}", extra=PERMANENT)
    wait_for_batch(sessions, batch_id, timeout=240, cluster=cluster)
    facts = check_exactly_once(sessions, batch_id, fake=fake, max_attempts=CALL_ATTEMPTS)
    for fault in pair:  # each kind really was injected at about its rate
        assert facts.faults[fault] >= RATE_EACH / 2 * facts.fake_requests, facts.faults

    with sessions() as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.batch_id == batch_id))}
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id.in_(jobs))
                          .order_by(ModelCall.job_id, ModelCall.id)).all()
    transient = [f for f in pair if f in ROW_ERROR]
    errors = {ROW_ERROR[f] for f in transient}
    by_key = {j.key: j for j in jobs.values()}

    for spec in PERMANENT:  # failed at once: one attempt, the API's message
        job = by_key[spec["key"]]
        assert job.status is JobStatus.FAILED, job.error
        assert "permanent error" in (job.error or "")
        assert "Injected fault: invalid request" in (job.error or "")
        assert [c.attempt for c in calls if c.job_id == job.id and c.status_code == 400] == [1]
    # Every error row is one of the injected transient faults (or a permanent job's 400).
    permanent_ids = {by_key[p["key"]].id for p in PERMANENT}
    assert {c.error_type for c in calls if c.outcome == "error" and c.job_id not in permanent_ids} <= errors
    for fault in transient:  # one row per injected fault: nothing hidden, nothing multiplied
        assert sum(1 for c in calls if c.error_type == ROW_ERROR[fault]) == facts.faults[fault]

    # Every other failure is explained by the faults, and ends with its reason.
    for key, error in facts.errors.items():
        if key.startswith(("doomed-", "permanent-")):
            continue
        # A transient error never fails a job (its stage waits and tries again); bad answers go
        # through validation: a job fails only after every tier's attempts failed it.
        assert "validation failed at opus" in error, error
    assert facts.by_status["succeeded"] >= 0.8 * facts.jobs, facts.by_status

    if "429" in pair:
        # Each request after a 429 waited at least the retry-after the API asked for.
        assert check_retry_after(fake.requests(), calls, seconds=1.0) > 0
    figures[f"claude {' + '.join(pair)}, each at {RATE_EACH:.0%}"] = summary(facts, injected=dict(facts.faults))
