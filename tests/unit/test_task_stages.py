"""The stages of a job under a task, in process, against the fake over HTTP through the real
client: the prompts carry the task's shared part with a breakpoint, and the task's max_tokens
caps the work call's."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
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
from pipeline.models import Batch, Job, JobStatus


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

    assert Handoff("triage", job_id, "triage") in p.run(lambda s: dispatch(s, max_in_flight=10_000))
    assert stages.triage(p, job_id) == Handoff("work", job_id, "sonnet")
    assert stages.work(p, job_id) == Handoff("validate", job_id, "validate")
    stages.validate(p, job_id)
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
