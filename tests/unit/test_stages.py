"""The stages as plain functions on Postgres and the fake Claude: no broker involved."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline import stages
from pipeline.claude import ClaudeClient
from pipeline.config import ModelConfig
from pipeline.dispatch import dispatch, sweep
from pipeline.enqueue import enqueue_file
from pipeline.fake_claude import FakeClaude
from pipeline.models import Job, JobEvent, JobStatus, ModelCall
from pipeline.stages import Handoff, Pipeline


@pytest.fixture
def pipeline(sessions: sessionmaker[Session], fake_claude: FakeClaude, models: ModelConfig) -> Iterator[Pipeline]:
    client = ClaudeClient(api_key="test", base_url=fake_claude.base_url, attempts=2, sleep=lambda s: None)
    yield Pipeline(sessions=sessions, client=client, models=models, max_deliveries=3)
    client.close()


_n = iter(range(10**6))


def enqueue(p: Pipeline, tmp_path: Path, *jobs: dict) -> list[int]:
    path = tmp_path / f"jobs-{next(_n)}.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    report = enqueue_file(p.sessions, path, batch=path.stem + tmp_path.name, config=p.models)
    with p.sessions() as s:
        return list(s.scalars(select(Job.id).where(Job.batch_id == report.batch_id).order_by(Job.id)))


def dispatched(p: Pipeline) -> list[Handoff]:
    return p.run(lambda s: dispatch(s, max_in_flight=10_000))


def run_to_end(p: Pipeline, handoffs: list[Handoff]) -> None:
    step = {"triage": stages.triage, "work": stages.work, "validate": stages.validate}
    while handoffs:
        h = handoffs.pop()
        nxt = step[h.stage](p, h.job_id)
        if nxt:
            handoffs.append(nxt)


def job(p: Pipeline, job_id: int) -> Job:
    with p.sessions() as s:
        return s.get_one(Job, job_id)


def test_a_job_walks_every_stage(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "classify", "text": "charged twice [fake:difficulty=easy]",
                                         "labels": ["billing", "bug"]})
    handoffs = [h for h in dispatched(pipeline) if h.job_id == jid]
    assert handoffs == [Handoff("triage", jid, "triage")]
    work = stages.triage(pipeline, jid)
    assert work == Handoff("work", jid, "sonnet")
    assert stages.work(pipeline, jid) == Handoff("validate", jid, "validate")
    assert stages.validate(pipeline, jid) is None
    done = job(pipeline, jid)
    assert done.status is JobStatus.SUCCEEDED and done.output["label"] in ("billing", "bug")
    with pipeline.sessions() as s:
        events = [(e.from_status, e.to_status) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == jid)
                                                                  .order_by(JobEvent.id))]
    assert events == [("queued", "triaging"), ("triaging", "working"), ("working", "validating"),
                      ("validating", "succeeded")]


def test_a_stale_message_moves_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "stale test"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    before = job(pipeline, jid)
    # The same messages delivered again after the job is done: nothing runs, nothing is called.
    with pipeline.sessions() as s:
        calls = s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.job_id == jid))
    for stage in (stages.triage, stages.work, stages.validate):
        assert stage(pipeline, jid) is None
    after = job(pipeline, jid)
    assert (after.version, after.status) == (before.version, before.status)
    with pipeline.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.job_id == jid)) == calls


def test_two_deliveries_at_once_move_the_job_once(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "twice [fake:latency_ms=300]"})
    dispatched(pipeline)
    results: list[Handoff | None] = []
    threads = [threading.Thread(target=lambda: results.append(stages.triage(pipeline, jid))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r is None for r in results) == [False, True]
    with pipeline.sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == jid)).all()
        moves = s.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == jid, JobEvent.from_status == JobStatus.TRIAGING))
    # Both calls happened and cost money; only one moved the job.
    assert len(calls) == 2 and sorted(c.applied for c in calls) == [False, True]
    assert moves == 1
    assert job(pipeline, jid).cost_usd == sum(c.cost_usd for c in calls)


def test_sonnet_failure_retries_with_feedback_then_escalates(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "classify", "text": "plan change [fake:difficulty=easy] "
                                         "[fake:invalid=sonnet]", "labels": ["billing", "bug"]})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert (done.status, done.tier, done.escalations) == (JobStatus.SUCCEEDED, "opus", 1)
    with pipeline.sessions() as s:
        works = s.scalars(select(ModelCall).where(ModelCall.job_id == jid, ModelCall.stage == "work")
                          .order_by(ModelCall.id)).all()
    assert [w.tier for w in works] == ["sonnet", "sonnet", "opus"]


def test_a_permanent_error_fails_the_job_with_the_api_message(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "x [fake:error=400@sonnet]",
                                         "tier": "sonnet"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert done.status is JobStatus.FAILED
    assert "work call to sonnet failed (permanent error): 400 invalid_request_error" in (done.error or "")


def test_a_poison_job_fails_after_bounded_deliveries(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "poison"})
    dispatched(pipeline)
    # As if three workers had died in the middle of this stage.
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id == jid).values(deliveries=3)))
    assert stages.triage(pipeline, jid) is None
    done = job(pipeline, jid)
    assert done.status is JobStatus.FAILED and "poison job" in (done.error or "")


def test_the_sweeper_republishes_a_stalled_stage(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "lost message"})
    dispatched(pipeline)  # published, then lost: no stage ever runs
    assert jid not in [h.job_id for h in pipeline.run(lambda s: sweep(s, deadline_s=3600))]
    swept = pipeline.run(lambda s: sweep(s, deadline_s=0))
    assert Handoff("triage", jid, "triage") in swept
    run_to_end(pipeline, [Handoff("triage", jid, "triage")])
    assert job(pipeline, jid).status is JobStatus.SUCCEEDED
