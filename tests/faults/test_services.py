"""The services fail under a running batch: Redis loses every message, Postgres drops every
connection (or restarts). Real worker processes, Postgres, Redis and the fake Claude."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.db import normalise_url
from pipeline.fake_claude import FakeClaude
from pipeline.models import Job, JobStatus
from pipeline.queries.ops import queue_depths
from tests.cluster import Cluster, wait_for_batch
from tests.faults.conftest import CALL_ATTEMPTS, enqueue_mixed, wait_for
from tests.faults.invariants import check_exactly_once, summary, unexpected_failures

pytestmark = pytest.mark.faults


def count(sessions: sessionmaker[Session], batch_id: int, *statuses: JobStatus) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Job)
                        .where(Job.batch_id == batch_id, Job.status.in_(statuses))) or 0


def queued_messages(broker_url: str) -> int:
    # Messages now carry a priority and a queue lives in one Redis list per priority step, so a
    # plain LLEN of the queue's name misses most of them: count every step, as the CLI does.
    depths = queue_depths(redis.Redis.from_url(broker_url), ("triage", "sonnet", "opus", "validate", "haiku"))
    return sum(depths.values())


def test_broker_loses_its_messages(make_fake: Callable[..., FakeClaude], make_cluster: Callable[..., Cluster],
                                   sessions: sessionmaker[Session], models: ModelConfig, broker_url: str,
                                   tmp_path: Path, figures: dict[str, Any]) -> None:
    """Wipe the broker mid-batch, with hundreds of messages queued. The dispatcher notices (its
    marker key is gone) and republishes every unclaimed stage at once; every job ends.

    FLUSHDB of the broker's database is the same loss for switchyard as a FLUSHALL or a restart of
    a Redis without persistence: switchyard keeps nothing else there. It is used here because this
    machine's Redis is shared with other test runs, each on its own database. The unclaimed-stage
    deadline is set far beyond the test's patience, so only the loss detection can save the batch."""
    fake = make_fake(latency_ms=60, latency_jitter_ms=60, seed=5)
    cluster = make_cluster(fake, env={"SWITCHYARD_STAGE_DEADLINE_S": "600"}, concurrency=8)
    batch_id = enqueue_mixed(sessions, models, tmp_path, "broker-loss")
    wait_for(lambda: queued_messages(broker_url) >= 100 and count(sessions, batch_id, JobStatus.SUCCEEDED) > 0,
             timeout=120, what="a busy broker")
    lost = queued_messages(broker_url)
    redis.Redis.from_url(broker_url).flushdb()
    flushed_at = time.monotonic()
    wait_for_batch(sessions, batch_id, timeout=180, cluster=cluster)
    recovered_s = time.monotonic() - flushed_at
    dispatcher = next(p for p in cluster.procs if p.name == "dispatcher")
    assert "the broker has lost its data" in dispatcher.log.read_text()
    facts = check_exactly_once(sessions, batch_id, fake=fake, max_attempts=CALL_ATTEMPTS)
    assert not unexpected_failures(facts), unexpected_failures(facts)
    figures["broker flushed"] = summary(facts, messages_lost=lost, batch_done_after_s=round(recovered_s, 1))


def _terminate_backends(database_url: str) -> int:
    """Kill every server-side connection to this test run's own database (and no one else's)."""
    name = make_url(normalise_url(database_url)).database
    admin = create_engine(make_url(normalise_url(database_url)).set(database="postgres"),
                          isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": name}).all())
    finally:
        admin.dispose()


def _run_batch_through(fault: Callable[[], Any], name: str, *, make_fake: Callable[..., FakeClaude],
                       make_cluster: Callable[..., Cluster], sessions: sessionmaker[Session],
                       models: ModelConfig, tmp_path: Path) -> Any:
    fake = make_fake(latency_ms=40, latency_jitter_ms=40, seed=9)
    cluster = make_cluster(fake)
    batch_id = enqueue_mixed(sessions, models, tmp_path, name)
    wait_for(lambda: count(sessions, batch_id, JobStatus.SUCCEEDED) >= 30, timeout=120, what="the batch to get going")
    outcome = fault()
    wait_for_batch(sessions, batch_id, timeout=180, cluster=cluster)
    facts = check_exactly_once(sessions, batch_id, fake=fake, max_attempts=CALL_ATTEMPTS)
    assert not unexpected_failures(facts), unexpected_failures(facts)
    assert all(p.alive for p in cluster.procs), cluster.logs()
    return facts, outcome


def test_postgres_drops_every_connection(make_fake: Callable[..., FakeClaude], make_cluster: Callable[..., Cluster],
                                         sessions: sessionmaker[Session], models: ModelConfig, database_url: str,
                                         tmp_path: Path, figures: dict[str, Any]) -> None:
    """pg_terminate_backend on every connection of the test database, three times in a row, while
    workers are mid-transaction: the contained form of a Postgres restart. Workers and the
    dispatcher reconnect (their engines have no pre-ping: Pipeline.run retries the unit of work that
    met a dead connection) and no job is lost or half-moved."""

    def drop_all() -> int:
        killed = 0
        for _ in range(3):
            killed += _terminate_backends(database_url)
            time.sleep(0.3)
        return killed

    facts, killed = _run_batch_through(drop_all, "pg-drop", make_fake=make_fake, make_cluster=make_cluster,
                                       sessions=sessions, models=models, tmp_path=tmp_path)
    assert killed > 0
    figures["postgres connections dropped"] = summary(facts, connections_killed=killed)


def _pg_cluster() -> str | None:
    """The local cluster's version, as pg_ctlcluster names it (the Debian layout of these machines)."""
    try:
        versions = sorted(os.listdir("/etc/postgresql"))
    except OSError:
        return None
    return versions[-1] if versions and shutil.which("pg_ctlcluster") else None


@pytest.mark.serial
@pytest.mark.skipif(os.environ.get("SWITCHYARD_FAULTS_PG_RESTART") != "1" and os.environ.get("CI") != "true",
                    reason="restarts the machine's shared Postgres: only in CI or with SWITCHYARD_FAULTS_PG_RESTART=1")
@pytest.mark.skipif(_pg_cluster() is None, reason="no local Debian Postgres cluster to restart")
def test_postgres_restarts(make_fake: Callable[..., FakeClaude], make_cluster: Callable[..., Cluster],
                           sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
                           figures: dict[str, Any]) -> None:
    """A real restart of the Postgres server mid-batch (the whole server, so only where this suite
    runs alone: CI, or on request)."""

    def restart() -> float:
        t0 = time.monotonic()
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", str(_pg_cluster()), "main", "restart"],
                       check=True, capture_output=True, timeout=120)
        return time.monotonic() - t0

    facts, took = _run_batch_through(restart, "pg-restart", make_fake=make_fake, make_cluster=make_cluster,
                                     sessions=sessions, models=models, tmp_path=tmp_path)
    figures["postgres restarted"] = summary(facts, restart_s=round(took, 1))
