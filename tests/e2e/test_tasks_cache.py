"""A batch under a task, for real: workers on Postgres and Redis calling the fake Claude over HTTP.
The task's shared part is long enough for every tier to cache, so after the first calls of each
tier the rest read it from the cache, and the model_calls rows record and price those tokens."""

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

    (tmp_path / "cluster").mkdir()
    cluster = Cluster(database_url=url, broker_url=broker_url, claude_url=fake_claude.base_url,
                      workdir=tmp_path / "cluster")
    cluster.start_all(concurrency=2)
    try:
        wait_for_batch(sessions, report.batch_id, timeout=120, cluster=cluster)
    finally:
        cluster.stop()

    with sessions() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == report.batch_id)).all()
        assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}, {j.key: j.error for j in jobs}
        calls = s.scalars(select(ModelCall).join(Job).where(Job.batch_id == report.batch_id)
                          .order_by(ModelCall.id)).all()
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
        # The first answer of each tier writes the cache; only calls already in flight beside it
        # (each worker runs two) can miss it too. Every later call reads.
        writes = sum(c.cache_creation_input_tokens > 0 for c in group)
        reads = sum(c.cache_read_input_tokens > 0 for c in group)
        assert 1 <= writes <= 2 and reads == len(group) - writes, (stage, tier, writes, reads)
    engine.dispose()
