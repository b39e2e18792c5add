"""`switchyard worker --concurrency N` above the split threshold: a parent and its worker processes.

Real processes: the parent starts the expected children with their shares of the threads, forwards
SIGTERM (each child finishes its calls, nothing is abandoned, everything exits 0), takes its children
down when it is SIGKILLed, and stops the group when one child dies on its own."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench.env import child_pids
from bench.jobs import classify_jobs, write_jsonl
from pipeline.cli.workergroup import THREADS_PER_PROCESS
from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import ModelCall
from tests.cluster import Cluster, Proc, wait_for_batch

pytestmark = pytest.mark.e2e

THREADS = THREADS_PER_PROCESS + 1  # just past the threshold: two processes, of 101 and 100 threads
GROUP_READY = "all 2 processes ready"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeClaude]:
    with FakeClaude(port=0, options=FakeOptions(latency_ms=1500)) as f:
        yield f


@pytest.fixture(scope="module")
def cluster(database_url: str, broker_url: str, fake: FakeClaude,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake.base_url,
                workdir=tmp_path_factory.mktemp("group"),
                env_extra={"SWITCHYARD_CLAIM_DEADLINE_S": "600", "SWITCHYARD_STAGE_DEADLINE_S": "600"})
    try:
        # Started together and given time: on a loaded machine each import takes tens of seconds.
        c.wait_ready([c.worker("validate", concurrency=8, wait=False), c.dispatcher(wait=False)], timeout=120)
        yield c
    finally:
        c.stop()


def group(cluster: Cluster) -> Proc:
    proc = cluster.worker("sonnet", concurrency=THREADS, wait=False)
    proc.ready = GROUP_READY
    cluster.wait_ready([proc], timeout=120)
    return proc


def children_of(pid: int) -> dict[int, str]:
    """Live processes whose parent is ``pid``: pid -> command line."""
    out = {}
    for child in child_pids(pid):
        with contextlib.suppress(OSError):
            out[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate: object, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def calls_started(sessions: sessionmaker[Session], batch_id: int) -> int:
    from pipeline.models import Job

    with sessions() as s:
        return s.scalar(select(func.count()).select_from(ModelCall).join(Job, Job.id == ModelCall.job_id)
                        .where(Job.batch_id == batch_id, ModelCall.outcome == "started")) or 0


def test_split_starts_children_and_sigterm_drains_them(cluster: Cluster, sessions: sessionmaker[Session],
                                                       models: ModelConfig, tmp_path: Path) -> None:
    parent = group(cluster)
    kids = children_of(parent.popen.pid)
    assert len(kids) == 2, kids
    shares = sorted(int(cmd.split("--concurrency ")[1].split()[0]) for cmd in kids.values())
    assert shares == [THREADS // 2, THREADS - THREADS // 2]
    assert all("--processes 1" in cmd for cmd in kids.values())
    # Calls in flight on both children, then SIGTERM to the parent's group, as a supervisor sends it.
    path = write_jsonl(tmp_path / "jobs.jsonl", classify_jobs(40, tier="sonnet", prefix="group"))
    report = enqueue_file(sessions, path, batch="worker-group", config=models)
    assert report.batch_id is not None
    wait_for(lambda: calls_started(sessions, report.batch_id) >= 10, timeout=120, what="calls in flight")
    parent.signal(signal.SIGTERM)
    assert parent.popen.wait(90) == 0, parent.tail()
    assert not any(alive(pid) for pid in kids), "a child outlived its parent's clean exit"
    # A fresh one-process worker finishes the rest: nothing was abandoned on the way.
    cluster.procs.remove(parent)
    cluster.worker("sonnet", concurrency=16)
    wait_for_batch(sessions, report.batch_id, timeout=180, cluster=cluster)
    with sessions() as s:
        from pipeline.models import Job

        outcomes = dict(s.execute(select(ModelCall.outcome, func.count()).join(Job, Job.id == ModelCall.job_id)
                                  .where(Job.batch_id == report.batch_id).group_by(ModelCall.outcome)).all())
    assert "abandoned" not in outcomes, outcomes
    for p in [p for p in cluster.procs if p.name == "worker-sonnet"]:
        p.signal(signal.SIGTERM)
        assert p.popen.wait(60) == 0
        cluster.procs.remove(p)


def test_sigkill_of_the_parent_takes_the_children(cluster: Cluster) -> None:
    parent = group(cluster)
    kids = children_of(parent.popen.pid)
    assert len(kids) == 2, kids
    parent.signal(signal.SIGKILL)
    assert parent.popen.wait(30) == -signal.SIGKILL
    cluster.procs.remove(parent)
    wait_for(lambda: not any(alive(pid) for pid in kids), timeout=30, what="the children to die with the parent")


def test_a_child_that_dies_stops_the_group(cluster: Cluster) -> None:
    parent = group(cluster)
    kids = list(children_of(parent.popen.pid))
    os.kill(kids[0], signal.SIGKILL)
    assert parent.popen.wait(90) != 0, parent.tail()
    cluster.procs.remove(parent)
    assert not alive(kids[1])
    assert "exited with -9; stopping the other 1" in parent.tail(200)
