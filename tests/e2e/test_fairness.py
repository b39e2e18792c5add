"""Priorities and fairness with real workers and the dispatcher: a later batch of another tenant, or
of a higher priority, is admitted ahead of a backlog that saturates the pipeline. Asserted on the
order of admission (each job's queued -> working event), not on how long anything took."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory, transaction
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import ACTIVE, Job, JobEvent, JobStatus
from tests.cluster import Cluster, wait_for_batch

THREADS, IN_FLIGHT = 2, 4


@pytest.fixture(scope="module")
def own(fresh_database: Callable[[str], str]) -> Iterator[tuple[str, sessionmaker[Session]]]:
    # A database of its own: the backlog left queued here must not be fed by another module's dispatcher.
    url = fresh_database("fairness")
    engine = make_engine(url, pool_size=2)
    yield url, session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def cluster(own: tuple[str, sessionmaker[Session]], broker_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Slow answers and few threads, so that the backlog keeps the pipeline full for the whole test.
    with FakeClaude(port=0, options=FakeOptions(latency_ms=150)) as fake:
        c = Cluster(database_url=own[0], broker_url=broker_url, claude_url=fake.base_url,
                    workdir=tmp_path_factory.mktemp("fairness"),
                    env_extra={"SWITCHYARD_MAX_IN_FLIGHT": str(IN_FLIGHT)})
        try:
            procs = [c.worker("sonnet", concurrency=THREADS, wait=False),
                     c.worker("validate", concurrency=THREADS, wait=False), c.dispatcher(wait=False)]
            c.wait_ready(procs, timeout=90)
            yield c
        finally:
            c.stop()


def enqueue(sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path, name: str, n: int, *,
            tenant: str, priority: int | None = None) -> int:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"key": f"{name}-{i}", "kind": "generate", "prompt": f"Say {i}",
                                        "tier": "sonnet"}) + "\n" for i in range(n)))
    with transaction(sessions) as s:
        tenant_id = tenants.get_or_create(s, tenant).id
    report = enqueue_file(sessions, path, batch=name, config=models, tenant_id=tenant_id, priority=priority)
    assert report.batch_id is not None and report.accepted == n
    return report.batch_id


def admitted_at(sessions: sessionmaker[Session], batch_id: int) -> list[datetime]:
    """When each job of the batch left the queue, in order."""
    with sessions() as s:
        return list(s.scalars(select(JobEvent.at).join(Job, Job.id == JobEvent.job_id)
                              .where(Job.batch_id == batch_id, JobEvent.from_status == JobStatus.QUEUED)
                              .order_by(JobEvent.at)))


def queued(sessions: sessionmaker[Session], batch_id: int) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id,
                                                                   Job.status == JobStatus.QUEUED)) or 0


def test_later_batches_are_admitted_ahead_of_a_backlog(cluster: Cluster, own: tuple[str, sessionmaker[Session]],
                                                       models: ModelConfig, tmp_path: Path) -> None:
    _, sessions = own
    backlog = enqueue(sessions, models, tmp_path, "backlog", 300, tenant="bulk")

    def full() -> bool:
        with sessions() as s:
            return (s.scalar(select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE))) or 0) >= IN_FLIGHT

    deadline = datetime.now().timestamp() + 60
    while not full():
        assert datetime.now().timestamp() < deadline, cluster.logs()
    # Another tenant, same priority: it takes the places that free up until it holds its half,
    # then alternates with the backlog; first come would have made it wait for all 300.
    other = enqueue(sessions, models, tmp_path, "other-tenant", 10, tenant="small")
    wait_for_batch(sessions, other, timeout=120, cluster=cluster)
    first, last = admitted_at(sessions, other)[0], admitted_at(sessions, other)[-1]
    between = [t for t in admitted_at(sessions, backlog) if first < t < last]
    assert len(between) <= 10, (len(between), first, last)
    assert queued(sessions, backlog) > 0  # the backlog was still there the whole time

    # A higher priority: once its first job is admitted, not one of the backlog's is until its last.
    urgent = enqueue(sessions, models, tmp_path, "urgent", 10, tenant="bulk", priority=9)
    wait_for_batch(sessions, urgent, timeout=120, cluster=cluster)
    first, last = admitted_at(sessions, urgent)[0], admitted_at(sessions, urgent)[-1]
    assert [t for t in admitted_at(sessions, backlog) if first < t < last] == []
    assert queued(sessions, backlog) > 0
    with sessions() as s:
        assert set(s.scalars(select(Job.status).where(Job.batch_id.in_([other, urgent])))) == {JobStatus.SUCCEEDED}
