"""A batch under a task, for real: workers on Postgres and Redis calling the fake Claude over HTTP.
The task's shared part is long enough for every tier to cache, so the first call of each stage and
tier writes it to the cache and every other call reads it, however many go at once (the warm-up
gate, pipeline.flow.warmup), and the model_calls rows record and price those tokens."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory, transaction
from pipeline.fake_claude import FakeClaude
from pipeline.intake import tasks
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, ModelCall
from tests.cluster import Cluster, wait_for_batch

SAMPLE = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "ticket-topic.toml"


def _run(sessions: sessionmaker[Session], *, batch_id: int, url: str, broker_url: str, fake_claude: FakeClaude,
         workdir: Path, concurrency: int, timeout: float) -> list[ModelCall]:
    """Work the batch on a cluster of real workers; every job must succeed. Its calls, in order."""
    workdir.mkdir()
    cluster = Cluster(database_url=url, broker_url=broker_url, claude_url=fake_claude.base_url, workdir=workdir)
    cluster.start_all(concurrency=concurrency)
    try:
        wait_for_batch(sessions, batch_id, timeout=timeout, cluster=cluster)
    finally:
        cluster.stop()
    with sessions() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}, {j.key: j.error for j in jobs}
        return list(s.scalars(select(ModelCall).join(Job).where(Job.batch_id == batch_id).order_by(ModelCall.id)))


def test_a_task_batch_reads_its_shared_part_from_the_cache(
        fresh_database: Callable[[str], str], broker_url: str, fake_claude: FakeClaude, models: ModelConfig,
        tmp_path: Path) -> None:
    url = fresh_database("tasks_cache")
    engine = make_engine(url, pool_size=2)
    sessions: sessionmaker[Session] = session_factory(engine)
    definition = tasks.read_toml(SAMPLE.read_text())
    # Long enough for Haiku's and Opus's 4,096-token minimum, and so for Sonnet's too.
    definition["instructions"] += " Read the whole ticket before you decide, including any quoted mail." * 300
    with transaction(sessions) as s:
        tasks.apply(s, tasks.parse_task(definition, work_tiers=models.work_tiers), tenant_id=None)
    path = tmp_path / "tickets.jsonl"
    path.write_text("".join(json.dumps({"key": f"t-{i}", "task": "ticket-topic",
                                        "text": f"Ticket {i}: I was charged twice for my plan."}) + "\n"
                            for i in range(30)))
    report = enqueue_file(sessions, path, batch="cached", config=models)
    assert report.accepted == 30 and report.batch_id is not None

    calls = _run(sessions, batch_id=report.batch_id, url=url, broker_url=broker_url, fake_claude=fake_claude,
                 workdir=tmp_path / "cluster", concurrency=2, timeout=120)
    by_tier: dict[tuple[str, str], list[ModelCall]] = defaultdict(list)
    for c in calls:
        assert c.outcome == "ok"
        by_tier[(c.stage.value, c.tier)].append(c)
        # Every call wrote the shared part to the cache or read it, and its cost prices both.
        assert c.cache_creation_input_tokens + c.cache_read_input_tokens > 4096, (c.stage, c.tier)
        usage = Usage(c.input_tokens, c.output_tokens, c.cache_creation_input_tokens, c.cache_read_input_tokens)
        assert c.cost_usd == call_cost(models.tier(c.tier), usage, config=models), c.id
        assert c.input_tokens < 100  # the job's own text: the shared part is not billed as plain input
    assert ("triage", models.triage_tier) in by_tier
    for (stage, tier), group in by_tier.items():
        # The first call of each tier writes the cache, the calls beside it wait for its answer,
        # and every other call reads.
        writes = sum(c.cache_creation_input_tokens > 0 for c in group)
        reads = sum(c.cache_read_input_tokens > 0 for c in group)
        assert writes == 1 and reads == len(group) - 1, (stage, tier, writes, reads)
    engine.dispose()


def test_calls_fired_together_write_each_cached_prefix_once(
        fresh_database: Callable[[str], str], broker_url: str, fake_claude: FakeClaude, models: ModelConfig,
        tmp_path: Path) -> None:
    """60 draft jobs under one task, through every stage and both work tiers, with enough worker
    threads that a stage's calls go out together and each answer takes a while: every cached
    prefix (the triage prompt, the work prompt at sonnet and at opus, the format check) is written
    by exactly one call, and every other call through it reads it. Without the warm-up gate
    (SWITCHYARD_CACHE_WARMUP_LEASE_S=0) the calls of the first wave each write it."""
    url = fresh_database("tasks_warmup")
    engine = make_engine(url, pool_size=2)
    sessions: sessionmaker[Session] = session_factory(engine)
    # A prefix of this test's own (the fake's cache lives as long as the session), over every
    # tier's minimum.
    definition = {"name": "reply-draft", "kind": "draft", "instructions": f"Drafts for run {tmp_path.name}. " + (
        "Answer the customer in their own language, briefly, and name the next step we take. " * 300)}
    with transaction(sessions) as s:
        tasks.apply(s, tasks.parse_task(definition, work_tiers=models.work_tiers), tenant_id=None)
    path = tmp_path / "drafts.jsonl"
    # Half easy (sonnet), half hard (opus); each call takes 300 ms at the fake, so those of a wave overlap.
    path.write_text("".join(json.dumps({
        "key": f"d-{i}", "task": "reply-draft",
        "instructions": f"Reply to ticket {i} [fake:latency_ms=300] [fake:difficulty={'easy' if i % 2 else 'hard'}]",
    }) + "\n" for i in range(60)))
    report = enqueue_file(sessions, path, batch="warmed", config=models)
    assert report.accepted == 60 and report.batch_id is not None

    calls = _run(sessions, batch_id=report.batch_id, url=url, broker_url=broker_url, fake_claude=fake_claude,
                 workdir=tmp_path / "cluster", concurrency=16, timeout=180)
    by_prefix: dict[tuple[str, str], list[ModelCall]] = defaultdict(list)
    for c in calls:
        assert c.outcome == "ok", (c.stage, c.tier, c.error_message)
        by_prefix[(c.stage.value, c.model)].append(c)
    assert set(by_prefix) == {("triage", models.tier(models.triage_tier).model),
                              ("work", models.tier("sonnet").model), ("work", models.tier("opus").model),
                              ("format_check", models.tier(models.format_check_tier).model)}
    for (stage, model), group in by_prefix.items():
        writes = [c for c in group if c.cache_creation_input_tokens > 0]
        readers = [c for c in group if c.cache_read_input_tokens > 0 and c.cache_creation_input_tokens == 0]
        assert len(writes) == 1 and len(readers) == len(group) - 1, (stage, model, len(writes), len(group))
    engine.dispose()
