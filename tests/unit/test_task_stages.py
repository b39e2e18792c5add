"""The stages of a job under a task, in process, against the fake over HTTP through the real
client: the prompts carry the task's shared part with a breakpoint, and the task's max_tokens
caps the work call's."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.client import CallResult, ClaudeClient
from pipeline.config import ModelConfig
from pipeline.db import transaction
from pipeline.fake_claude import FakeClaude
from pipeline.flow import stages
from pipeline.flow.dispatch import dispatch
from pipeline.flow.prompts import TRIAGE_SCHEMA
from pipeline.flow.stages import Handoff, Pipeline
from pipeline.intake import tasks
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Batch, Job, JobStatus, ModelCall


class Recording:
    """The real client, with each call's arguments noted on the way through."""

    def __init__(self, inner: ClaudeClient) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    def call(self, *, tier: str, model: str, system: str, user: str, max_tokens: int,
             on_retry: Callable[[int], None] | None = None, cache_system: bool = False,
             cache_ttl: str = "5m", output_schema: dict[str, Any] | None = None) -> CallResult:
        self.calls.append({"tier": tier, "system": system, "user": user, "max_tokens": max_tokens,
                           "cache_system": cache_system, "output_schema": output_schema})
        return self.inner.call(tier=tier, model=model, system=system, user=user, max_tokens=max_tokens,
                               on_retry=on_retry, cache_system=cache_system, cache_ttl=cache_ttl,
                               output_schema=output_schema)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def recorded(sessions: sessionmaker[Session], fake_claude: FakeClaude,
             models: ModelConfig) -> Iterator[tuple[Pipeline, Recording]]:
    client = Recording(ClaudeClient(api_key="test", base_url=fake_claude.base_url, attempts=2, sleep=lambda s: None))
    yield Pipeline(sessions=sessions, client=client, models=models, max_deliveries=3), client
    client.close()


def test_a_task_job_through_its_stages(recorded: tuple[Pipeline, Recording], tmp_path: Path) -> None:
    p, client = recorded
    definition = {"name": "stage-topic", "kind": "classify", "max_tokens": 64,
                  "instructions": "Decide by what the customer asks for. " * 500,
                  "labels": [{"name": "billing", "description": "Money."}, {"name": "bug", "description": "Broken."}]}
    with transaction(p.sessions) as s:
        tasks.apply(s, tasks.parse_task(definition, work_tiers=p.models.work_tiers), tenant_id=None)
    path = tmp_path / "stage.jsonl"
    path.write_text(json.dumps({"key": "s", "task": "stage-topic", "text": "charged twice [fake:difficulty=easy]"}))
    report = enqueue_file(p.sessions, path, batch="stage-task", config=p.models)
    with p.sessions() as s:
        job_id = s.scalar(select(Job.id).join(Batch).where(Batch.name == "stage-task"))
    assert job_id is not None

    assert Handoff("triage", job_id, "triage", priority=4) in p.run(lambda s: dispatch(s, max_in_flight=10_000))
    assert stages.triage(p, job_id) == Handoff("work", job_id, "sonnet")
    assert stages.work(p, job_id) is None  # the label check is applied with the answer
    with p.sessions() as s:
        done = s.get_one(Job, job_id)
        assert (done.status, done.output) == (JobStatus.SUCCEEDED, {"label": "billing"}), done.error
    triage, work = client.calls
    assert triage["cache_system"] and work["cache_system"]  # ~5,000 tokens: over every tier's minimum
    assert work["user"] == "<text>\ncharged twice [fake:difficulty=easy]\n</text>"
    assert "- billing: Money." in work["system"]
    assert work["max_tokens"] == 64 and triage["max_tokens"] == p.models.limits.triage_max_tokens
    assert work["output_schema"]["properties"]["label"]["enum"] == ["billing", "bug"]
    assert triage["output_schema"] == TRIAGE_SCHEMA
    assert report.accepted == 1


def test_with_caching_off_no_call_has_a_breakpoint(sessions: sessionmaker[Session], fake_claude: FakeClaude,
                                                  models: ModelConfig, tmp_path: Path) -> None:
    # The same long task as above, with [caching] enabled = false: every prompt goes without a
    # breakpoint, and the API (the fake) writes and reads nothing.
    client = Recording(ClaudeClient(api_key="test", base_url=fake_claude.base_url, attempts=2, sleep=lambda s: None))
    p = Pipeline(sessions=sessions, client=client, models=dataclasses.replace(models, caching=False), max_deliveries=3)
    definition = {"name": "uncached-topic", "kind": "classify", "instructions": "Decide by what the customer asks for. "
                  * 500, "labels": [{"name": "billing", "description": "Money."}, {"name": "bug", "description": "x"}]}
    with transaction(p.sessions) as s:
        tasks.apply(s, tasks.parse_task(definition, work_tiers=p.models.work_tiers), tenant_id=None)
    path = tmp_path / "uncached.jsonl"
    lines = [{"key": f"u{i}", "task": "uncached-topic", "text": f"charged twice, ticket {i} [fake:difficulty=easy]"}
             for i in range(2)]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    enqueue_file(p.sessions, path, batch="uncached-task", config=p.models)
    with p.sessions() as s:
        job_ids = s.scalars(select(Job.id).join(Batch).where(Batch.name == "uncached-task")).all()
    p.run(lambda s: dispatch(s, max_in_flight=10_000))
    for job_id in job_ids:
        assert stages.triage(p, job_id) == Handoff("work", job_id, "sonnet")
        assert stages.work(p, job_id) is None
    client.close()
    assert len(client.calls) == 4 and not any(c["cache_system"] for c in client.calls)
    with p.sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id.in_(job_ids))).all()
        statuses = set(s.scalars(select(Job.status).where(Job.id.in_(job_ids))))
    assert statuses == {JobStatus.SUCCEEDED}
    assert len(calls) == 4 and all(c.input_tokens > 4096 for c in calls)
    assert sum(c.cache_creation_input_tokens + c.cache_read_input_tokens for c in calls) == 0


def test_a_call_beside_the_warm_up_of_its_prefix_waits_in_the_queue_then_reads(
        recorded: tuple[Pipeline, Recording], tmp_path: Path) -> None:
    """While one job's triage call writes the task's prefix to the cache, another job's triage of
    the same task is handed back to its queue (a countdown, no delivery counted, no call row),
    and once the first has answered it goes and reads the prefix."""
    p, client = recorded
    definition = {"name": "warm-topic", "kind": "classify",
                  # Its own prefix: the fake's cache lives as long as the test session.
                  "instructions": f"Warm-up test {tmp_path.name}. Decide by what the customer asks for. " * 500,
                  "labels": [{"name": "billing", "description": "Money."}, {"name": "bug", "description": "Broken."}]}
    with transaction(p.sessions) as s:
        tasks.apply(s, tasks.parse_task(definition, work_tiers=p.models.work_tiers), tenant_id=None)
    path = tmp_path / "warm.jsonl"
    path.write_text("".join(json.dumps({"key": f"w{i}", "task": "warm-topic", "text": f"charged twice {i}"}) + "\n"
                            for i in range(2)))
    enqueue_file(p.sessions, path, batch="warm-task", config=p.models)
    with p.sessions() as s:
        first, second = s.scalars(select(Job.id).join(Batch).where(Batch.name == "warm-task").order_by(Job.id))
    p.run(lambda s: dispatch(s, max_in_flight=10_000))

    beside: list[Handoff | None] = []
    inner_call = client.inner.call
    calls = iter(range(10))

    def call_with_a_neighbour(**kwargs: Any) -> CallResult:
        if next(calls) == 0:  # the first call, in flight: the second job's triage comes now
            beside.append(stages.triage(p, second))
        return inner_call(**kwargs)

    client.inner.call = call_with_a_neighbour  # type: ignore[method-assign]
    assert stages.triage(p, first) is not None
    [handed_back] = beside
    assert handed_back is not None and handed_back.stage == "triage" and handed_back.delay_s > 0
    with p.sessions() as s:
        waiting = s.get_one(Job, second)
        assert (waiting.status, waiting.deliveries, waiting.claimed_at) == (JobStatus.TRIAGING, 0, None)
        assert s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.job_id == second)) == 0
        [warmer] = s.scalars(select(ModelCall).where(ModelCall.job_id == first))
    assert warmer.cache_creation_input_tokens > 0 and warmer.cache_read_input_tokens == 0

    assert stages.triage(p, second) is not None  # the prefix is warm: it goes, and reads it
    with p.sessions() as s:
        [reader] = s.scalars(select(ModelCall).where(ModelCall.job_id == second))
    assert reader.cache_read_input_tokens > 0 and reader.cache_creation_input_tokens == 0
