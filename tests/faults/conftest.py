"""Fixtures of the fault matrix: a fake Claude per test (with its own faults), a cluster of real
worker processes per test (with short timeouts so a case takes seconds), and a batch of at least
300 mixed jobs. Figures measured by the cases (recovery time after a kill...) go to tests/figures.py,
which prints them at the end of the run."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.intake.enqueue import enqueue_file
from tests.cluster import Cluster
from tests.e2e.test_pipeline import mixed_jobs
from tests.figures import FIGURES

BATCH_SIZE = 300
CALL_ATTEMPTS = 4
# Short enough that the whole matrix runs in minutes, long enough to stay clear of a busy 2-core
# machine: a call attempt times out after 2 s, a claim with no sign of life for 5 s is taken for a
# dead worker, and an unclaimed stage (queued, never begun) is republished after 60 s (long enough
# that a loaded CI machine's queue waits do not fill the queues with harmless duplicates). A stage
# whose attempts all meet transient errors waits 1 s, then as long as it has waited, up to 8 s.
FAST_ENV = {
    "SWITCHYARD_CALL_TIMEOUT_S": "2",
    "SWITCHYARD_CALL_ATTEMPTS": str(CALL_ATTEMPTS),
    "SWITCHYARD_RETRY_MAX_BACKOFF_S": "0.5",
    "SWITCHYARD_CLAIM_DEADLINE_S": "5",
    "SWITCHYARD_STAGE_DEADLINE_S": "60",
    "SWITCHYARD_DISPATCH_INTERVAL_S": "0.2",
    "SWITCHYARD_MAX_DELIVERIES": "3",
    "SWITCHYARD_TRANSIENT_WAIT_MIN_S": "1",
    "SWITCHYARD_TRANSIENT_WAIT_MAX_S": "8",
}

@pytest.fixture
def figures() -> dict[str, Any]:
    return FIGURES


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeClaude]]:
    fakes: list[FakeClaude] = []

    def make(**options: Any) -> FakeClaude:
        fake = FakeClaude(port=0, options=FakeOptions(**options)).start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()


@pytest.fixture
def make_cluster(database_url: str, broker_url: str, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(fake: FakeClaude, *, env: dict[str, str | None] | None = None, concurrency: int = 16,
             start: bool = True) -> Cluster:
        # A variable given as None is left unset: the process derives its production default.
        merged = {**FAST_ENV, **(env or {})}
        cluster = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake.base_url,
                          workdir=tmp_path, env_extra={k: v for k, v in merged.items() if v is not None})
        clusters.append(cluster)
        if start:
            cluster.start_all(concurrency=concurrency)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()


def enqueue_mixed(sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path, name: str, *,
                  extra: list[dict[str, Any]] | None = None, size: int = BATCH_SIZE) -> int:
    """A batch of ``size`` mixed jobs (the end-to-end mix: every kind, steered routes, pinned tiers,
    two built to fail validation), plus ``extra``."""
    jobs = mixed_jobs(size - 2 - len(extra or []), seed=zlib.crc32(name.encode())) + (extra or [])
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    report = enqueue_file(sessions, path, batch=name, config=models)
    assert report.accepted == size
    assert report.batch_id is not None
    return report.batch_id


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll until ``predicate()``; return the seconds it took. Fails the test after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0
