"""A stage whose tier has no budget soon enough hands its job back instead of holding a thread:
real Postgres, real Redis, the real SDK against the fake Claude over HTTP."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.ratelimit import RedisRateLimiter, TierLimits
from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.flow import stages
from pipeline.flow.dispatch import dispatch
from pipeline.flow.runtime import build_pipeline
from pipeline.flow.stages import Pipeline
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, ModelCall
from pipeline.settings import Settings


@pytest.fixture(scope="module")
def slow_retry_fake() -> Iterator[FakeClaude]:
    """A fake whose 429s ask for a 30 s pause: longer than a stage may hold its thread."""
    with FakeClaude(port=0, options=FakeOptions(retry_after_s=30)) as fake:
        yield fake


def pinned_job(sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path, text: str) -> int:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"key": "k", "kind": "classify", "text": text, "labels": ["a", "b"],
                                "tier": "sonnet"}) + "\n")
    report = enqueue_file(sessions, path, batch=f"handback-{uuid.uuid4().hex[:8]}", config=models)
    with sessions() as s:
        job_id = s.scalars(select(Job.id).where(Job.batch_id == report.batch_id)).one()
    with sessions() as s, s.begin():
        (handoff,) = [h for h in dispatch(s, max_in_flight=10**6) if h.job_id == job_id]
    assert handoff.queue == "sonnet"
    return job_id


def make_pipeline(database_url: str, base_url: str, limiter: RedisRateLimiter) -> Pipeline:
    settings = Settings(DATABASE_URL=database_url, ANTHROPIC_API_KEY="test", ANTHROPIC_BASE_URL=base_url)
    return build_pipeline(settings, concurrency=2, limiter=limiter)


def test_an_exhausted_budget_hands_the_job_back_unstarted(
    database_url: str, broker_url: str, sessions: sessionmaker[Session], models: ModelConfig,
    fake_claude: FakeClaude, tmp_path: Path,
) -> None:
    client = redis.Redis.from_url(broker_url)
    client.delete(*RedisRateLimiter.keys("sonnet"))
    limiter = RedisRateLimiter(client, {"sonnet": TierLimits(rpm=1)}, window_s=600, max_wait_s=1)
    limiter.reserve("sonnet", input_tokens=1, output_tokens=1)  # someone else took the only turn
    p = make_pipeline(database_url, fake_claude.base_url, limiter)
    job_id = pinned_job(sessions, models, tmp_path, "Refund please")
    sent_before = len(fake_claude.requests())

    handoff = stages.work(p, job_id)

    assert handoff is not None
    assert (handoff.stage, handoff.queue, handoff.job_id) == ("work", "sonnet", job_id)
    assert 1 < handoff.delay_s <= stages.MAX_DEFER_S + 1
    assert len(fake_claude.requests()) == sent_before  # nothing was sent
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.status is JobStatus.WORKING
        assert job.deliveries == 0  # a hand-back is not a delivery towards the poison bound
        assert s.scalars(select(ModelCall).where(ModelCall.job_id == job_id)).all() == []

    # With budget again, the same message runs the stage to its end.
    client.delete(*RedisRateLimiter.keys("sonnet"))
    again = stages.work(p, job_id)
    # A classify answer's label check is a verdict that needs no model: the work stage applies it
    # itself, so the job ends here instead of being handed to the validate queue.
    assert again is None
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.status is JobStatus.SUCCEEDED
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == job_id)).all()
        assert [c.outcome for c in calls] == ["ok"]
    p.client.close()


def test_a_long_retry_after_hands_the_job_back_with_its_429_recorded(
    database_url: str, broker_url: str, sessions: sessionmaker[Session], models: ModelConfig,
    slow_retry_fake: FakeClaude, tmp_path: Path,
) -> None:
    client = redis.Redis.from_url(broker_url)
    client.delete(*RedisRateLimiter.keys("sonnet"))
    limiter = RedisRateLimiter(client, {"sonnet": TierLimits()}, window_s=60, max_wait_s=2)
    p = make_pipeline(database_url, slow_retry_fake.base_url, limiter)
    job_id = pinned_job(sessions, models, tmp_path, "Charged twice [fake:error=429@sonnet] [fake:times=1]")

    handoff = stages.work(p, job_id)

    assert handoff is not None
    assert handoff.queue == "sonnet"
    assert 25 < handoff.delay_s <= 31  # the pause the 429 asked for, plus jitter
    assert 25 < limiter.paused_for("sonnet") <= 30  # and every sonnet worker now waits it out
    statuses = [r["status"] for r in slow_retry_fake.requests()]
    assert statuses == [429]
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.status is JobStatus.WORKING
        assert job.deliveries == 0
        (call,) = s.scalars(select(ModelCall).where(ModelCall.job_id == job_id)).all()
        assert (call.outcome, call.status_code, call.applied) == ("error", 429, False)
    client.delete(*RedisRateLimiter.keys("sonnet"))
    p.client.close()
