"""A small batch through real workers (tests/cluster.py) and the fake Claude, then the history
commands on what they wrote: `enqueue --wait`, `jobs show` for an escalated job, `stats` against
the raw rows, and `export` back to the input keys."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.fake_claude import FakeClaude
from pipeline.models import Batch, Job, ModelCall, RoutingDecision, ValidationVerdict
from pipeline.queries import rollups
from tests.cluster import Cluster
from tests.history.helpers import LABELS, switchyard, switchyard_json, write_jsonl

BATCH = "story"
# Under structured outputs (the bundled configuration) a classify answer keeps to its labels, so the
# classify jobs steered to fail do it the way the decoder still allows: the model refuses.
JOBS = [
    {"key": "esc-classify", "kind": "classify", "labels": LABELS,
     "text": "I was charged twice [fake:difficulty=easy] [fake:error=refusal@sonnet]"},
    {"key": "esc-generate", "kind": "generate", "prompt": "Two lines on rivers [fake:difficulty=medium] "
                                                          "[fake:invalid=sonnet]"},
    {"key": "plain-1", "kind": "classify", "labels": LABELS, "text": "The app crashes on login"},
    {"key": "plain-2", "kind": "draft", "instructions": "Apologise for the delay", "context": "Order 7"},
    {"key": "hard", "kind": "generate", "prompt": "A proof sketch [fake:difficulty=hard]"},
    {"key": "pinned", "kind": "generate", "prompt": "Three taglines", "tier": "opus"},
    {"key": "flaky", "kind": "classify", "labels": LABELS,
     "text": "Refund please [fake:difficulty=easy] [fake:error=500@sonnet] [fake:times=1]"},
    {"key": "doomed", "kind": "classify", "labels": LABELS, "text": "Nothing fits [fake:error=refusal@sonnet,opus]"},
]


@pytest.fixture(scope="module")
def story(history_url: str, broker_url: str, fake_claude: FakeClaude,
          tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("story")
    cluster = Cluster(database_url=history_url, broker_url=broker_url, claude_url=fake_claude.base_url,
                      workdir=work)
    cluster.start_all(concurrency=4)
    try:
        path = write_jsonl(work / "story.jsonl", JOBS)
        # --wait follows the batch to its end; --json prints the final per-tier counts.
        out = switchyard_json(history_url, "enqueue", str(path), "--batch", BATCH, "--wait")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
    jobs = switchyard_json(history_url, "jobs", "list", "--batch", BATCH)["jobs"]
    return {"enqueue": out, "ids": {j["key"]: j["id"] for j in jobs}, "path": path}


def test_enqueue_wait_follows_the_batch_to_the_end(story: dict) -> None:
    out = story["enqueue"]
    assert out["accepted"] == len(JOBS)
    progress = out["progress"]
    assert progress["done"] == progress["total"] == len(JOBS)
    assert progress["by_status"] == {"succeeded": len(JOBS) - 1, "failed": 1}
    assert sum(sum(c.values()) for c in progress["by_tier"].values()) == len(JOBS)
    assert progress["by_tier"]["opus"]["succeeded"] >= 3  # the two escalated, hard, pinned
    # ...and the most common failure reasons, with their counts.
    assert out["failure_reasons"] == [{"reason": "validation failed at opus", "jobs": 1}]


def test_enqueue_wait_shows_the_failure_reasons(history_url: str, story: dict) -> None:
    # The same file again: nothing new, and the batch is already done, so --wait draws it once.
    shown = switchyard(history_url, "enqueue", str(story["path"]), "--batch", BATCH, "--wait")
    assert "0 new job(s)" in shown.stdout
    assert "failed, the most common reasons first:" in shown.stderr
    assert re.search(r"\n +1  validation failed at opus$", shown.stderr.rstrip()), shown.stderr


def test_jobs_show_tells_the_whole_story_of_an_escalated_job(history_url: str, story: dict,
                                                             history_sessions: sessionmaker[Session]) -> None:
    job_id = story["ids"]["esc-classify"]
    shown = switchyard_json(history_url, "jobs", "show", str(job_id))

    assert shown["job"]["status"] == "succeeded"
    assert shown["job"]["tier"] == "opus"
    assert shown["job"]["escalations"] == 1
    assert shown["payload"]["text"].startswith("I was charged twice")
    assert shown["triage"]["verdict"] == "easy"
    assert shown["triage"]["to_tier"] == "sonnet"
    assert shown["triage"]["reason"]
    assert [(e["from_tier"], e["to_tier"]) for e in shown["escalations"]] == [("sonnet", "opus")]
    # Sonnet answered wrongly twice (first try and the retry with feedback), then Opus got it.
    assert [(v["tier"], v["attempt"], v["ok"]) for v in shown["validations"]] == [
        ("sonnet", 1, False), ("sonnet", 2, False), ("opus", 1, True)]
    assert [v["problems"] for v in shown["validations"] if not v["ok"]] == [["the model refused to answer"]] * 2
    work = [(c["tier"], c["outcome"]) for c in shown["calls"] if c["stage"] == "work"]
    assert work == [("sonnet", "ok"), ("sonnet", "ok"), ("opus", "ok")]
    assert shown["calls"][0]["stage"] == "triage"
    assert shown["calls"][0]["tier"] == "haiku"
    for c in shown["calls"]:
        assert c["input_tokens"] > 0
        assert c["output_tokens"] > 0
        assert Decimal(c["cost_usd"]) > 0
        assert c["latency_ms"] is not None
        assert c["request_id"].startswith("req_")
    assert sum(Decimal(c["cost_usd"]) for c in shown["calls"]) == Decimal(shown["job"]["cost_usd"])
    assert shown["output"] in LABELS or shown["output"].get("label") in LABELS
    steps = [(e["from_status"], e["to_status"]) for e in shown["events"]]
    # Each refusal is judged where the answer is recorded (no model decides it): no validate hop.
    assert steps == [("queued", "triaging"), ("triaging", "working"), ("working", "working"),
                     ("working", "working"), ("working", "succeeded")]

    # The same facts as the rows hold.
    with history_sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == job_id).order_by(ModelCall.id)).all()
        assert [c["id"] for c in shown["calls"]] == [c.id for c in calls]
        assert [c["input_tokens"] for c in shown["calls"]] == [c.input_tokens for c in calls]

    # And for a person: the story reads top to bottom (--wide: with each call's model).
    text = switchyard(history_url, "jobs", "show", str(job_id), "--wide").stdout
    for words in ("triage verdict easy", "escalation: sonnet -> opus", "model calls", "validation", "timeline",
                  "claude-opus"):
        assert words in text, text


def test_failed_job_shows_its_error(history_url: str, story: dict) -> None:
    shown = switchyard_json(history_url, "jobs", "show", str(story["ids"]["doomed"]))
    assert shown["job"]["status"] == "failed"
    assert "validation failed at opus" in shown["job"]["error"]
    assert "validation failed at opus" in switchyard(history_url, "jobs", "show", str(story["ids"]["doomed"])).stdout


def test_stats_sum_to_the_raw_rows(history_url: str, story: dict, history_sessions: sessionmaker[Session]) -> None:
    stats = switchyard_json(history_url, "stats", "--batch", BATCH)
    tiers = {t["tier"]: t for t in stats["tiers"]}
    with history_sessions() as s:
        batch_id = s.scalar(select(Batch.id).where(Batch.name == BATCH))
        jobs = s.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        calls = s.scalars(select(ModelCall).join(Job).where(Job.batch_id == batch_id)).all()
        verdicts = s.scalars(select(ValidationVerdict).join(Job).where(Job.batch_id == batch_id)).all()
        escalations = s.scalars(select(RoutingDecision).join(Job).where(
            Job.batch_id == batch_id, RoutingDecision.reason_kind == "escalation")).all()

    assert stats["jobs"] == len(jobs) == len(JOBS)
    assert Decimal(stats["cost_usd"]) == sum(j.cost_usd for j in jobs)
    by_tier: dict[str, list[ModelCall]] = defaultdict(list)
    for c in calls:
        by_tier[c.tier].append(c)
    assert set(by_tier) <= set(tiers)
    for name, line in tiers.items():
        mine = by_tier.get(name, [])
        assert line["calls"] == len(mine), name
        assert line["input_tokens"] == sum(c.input_tokens for c in mine), name
        assert line["output_tokens"] == sum(c.output_tokens for c in mine), name
        assert Decimal(line["cost_usd"]) == sum((c.cost_usd for c in mine), Decimal(0)), name
        assert line["failed_calls"] == sum(c.outcome == "error" for c in mine), name
        assert line["repeated_calls"] == sum(c.delivery > 1 for c in mine), name
        assert line["abandoned_calls"] == sum(c.outcome == "abandoned" for c in mine), name
        assert line["jobs"] == sum(j.tier == name for j in jobs), name
        latencies = [c.latency_ms for c in mine if c.latency_ms is not None]
        # On Postgres, stats reads the rollups: the percentiles are the latency histogram's.
        hist = rollups.histogram(latencies)
        assert line["p50_latency_ms"] == pytest.approx(rollups.percentile(hist, 0.5)), name
        assert line["p95_latency_ms"] == pytest.approx(rollups.percentile(hist, 0.95)), name
        assert line["escalations"] == sum(e.from_tier == name for e in escalations), name
        assert line["validations"] == sum(v.tier == name for v in verdicts), name
        assert line["validation_failures"] == sum(v.tier == name and not v.ok for v in verdicts), name
    assert tiers["sonnet"]["escalations"] >= 2  # the two steered ones, and doomed if triage sent it there
    assert tiers["sonnet"]["escalation_rate"] == pytest.approx(tiers["sonnet"]["escalations"]
                                                               / tiers["sonnet"]["worked"])
    assert tiers["sonnet"]["failed_calls"] >= 1  # the flaky job's 500, retried inside its call
    assert sum(t["calls"] for t in stats["tiers"]) == len(calls)
    assert Decimal(stats["saving_usd"]) == Decimal(stats["top_tier_cost_usd"]) - Decimal(stats["cost_usd"])

    assert stats["failure_reasons"] == [{"reason": "validation failed at opus", "jobs": 1}]
    table = switchyard(history_url, "stats", "--batch", BATCH).stdout
    assert "saved" in table
    assert "p95" in table
    assert re.search(r"failed, the most common reasons first:\n +1  validation failed at opus\n", table), table


def test_export_round_trips_to_the_input_keys(history_url: str, story: dict, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in switchyard(history_url, "export", BATCH).stdout.splitlines()]
    assert [r["key"] for r in rows] == [j["key"] for j in JOBS]
    for r in rows:
        if r["key"] == "doomed":
            assert r["status"] == "failed"
            assert r["error"]
        else:
            assert r["status"] == "succeeded"
            assert r["output"] is not None
        assert Decimal(r["cost_usd"]) > 0

    out = tmp_path / "story.csv"
    switchyard(history_url, "export", BATCH, "--format", "csv", "--out", str(out))
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["key"] for r in table] == [j["key"] for j in JOBS]
    assert [r["status"] for r in table] == [r["status"] for r in rows]
