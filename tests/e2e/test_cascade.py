"""A cascade policy for real (pipeline/samples/cascade.toml: easy -> haiku, escalation haiku ->
sonnet -> opus): worker processes for the five queues, haiku's among them, and the dispatcher, on
Postgres and Redis, calling the fake Claude over HTTP through the official SDK."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig, load_config
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude import FakeClaude
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, ModelCall, RoutingDecision, Stage
from pipeline.queries.report import summarize
from tests.cluster import SWITCHYARD, Cluster, wait_for_batch

pytestmark = pytest.mark.e2e

CASCADE = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "cascade.toml"
LABELS = ["billing", "bug", "account", "other"]
# A drafted or generated answer is judged by Haiku's format check, which the fake fails on an
# [fake:invalid=...] answer whatever the kind's output format (structured outputs do not apply).
JOBS = [
    {"key": "easy-generate", "kind": "generate", "prompt": "Three taglines for a bakery [fake:difficulty=easy]"},
    {"key": "easy-classify", "kind": "classify", "text": "I was charged twice [fake:difficulty=easy]",
     "labels": LABELS},
    {"key": "medium", "kind": "generate", "prompt": "Summarise our refund policy [fake:difficulty=medium]"},
    # Haiku's answers fail validation, its retry's too: the job climbs to Sonnet, which passes.
    {"key": "climbs", "kind": "draft", "instructions": "Apologise for the delay [fake:difficulty=easy] "
                                                       "[fake:invalid=haiku]", "context": "Order #4471"},
    # ...and one that Sonnet gets wrong too climbs the whole chain.
    {"key": "climbs-twice", "kind": "generate", "prompt": "Name the release [fake:difficulty=easy] "
                                                         "[fake:invalid=haiku,sonnet]"},
    {"key": "pinned", "kind": "generate", "prompt": "Five subject lines", "tier": "haiku"},
    {"key": "doomed", "kind": "draft", "instructions": "Write nonsense [fake:difficulty=easy] [fake:invalid=all]"},
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cascade() -> ModelConfig:
    return load_config(CASCADE)


@pytest.fixture(scope="module")
def own_sessions(fresh_database: Callable[[str], str]) -> Iterator[tuple[str, sessionmaker[Session]]]:
    # A database of its own: the cascade's dispatcher must not feed another module's queued jobs.
    url = fresh_database("cascade")
    engine = make_engine(url)
    yield url, session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def cluster(own_sessions: tuple[str, sessionmaker[Session]], broker_url: str, fake_claude: FakeClaude,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(database_url=own_sessions[0], broker_url=broker_url, claude_url=fake_claude.base_url,
                workdir=tmp_path_factory.mktemp("cascade"), env_extra={"SWITCHYARD_CONFIG": str(CASCADE)})
    try:
        procs = [c.worker(q, concurrency=4, wait=False,
                          extra=["--metrics-port", str(free_port())] if q == "haiku" else None)
                 for q in load_config(CASCADE).queues]
        procs.append(c.dispatcher(wait=False))
        c.wait_ready(procs, timeout=90)
        yield c
    finally:
        c.stop()


def haiku_metrics(cluster: Cluster) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    (proc,) = [p for p in cluster.procs if p.name == "worker-haiku"]
    port = proc.args[proc.args.index("--metrics-port") + 1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_easy_jobs_are_worked_by_haiku_and_failed_answers_climb_the_chain(
        cluster: Cluster, own_sessions: tuple[str, sessionmaker[Session]], cascade: ModelConfig,
        fake_claude: FakeClaude, tmp_path: Path) -> None:
    sessions = own_sessions[1]
    path = tmp_path / "cascade.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in JOBS))
    report = enqueue_file(sessions, path, batch="cascade", config=cascade)
    assert report.accepted == len(JOBS) and report.batch_id is not None
    wait_for_batch(sessions, report.batch_id, timeout=180, cluster=cluster)
    served = {r["request_id"]: r for r in fake_claude.requests()}

    with sessions() as s:
        jobs = {j.key: j for j in s.scalars(select(Job).where(Job.batch_id == report.batch_id))}

        def work_calls(key: str) -> list[tuple[str, str]]:
            calls = s.scalars(select(ModelCall).where(ModelCall.job_id == jobs[key].id, ModelCall.stage == Stage.WORK)
                              .order_by(ModelCall.id)).all()
            # Each one really went to the fake as that tier's model.
            for c in calls:
                assert served[c.request_id]["model"] == cascade.tier(c.tier).model == c.model, (key, c.tier)
            return [(c.tier, c.outcome) for c in calls]

        def moves(key: str) -> list[tuple[str, str | None, str]]:
            return [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(RoutingDecision.reason_kind, RoutingDecision.from_tier, RoutingDecision.to_tier)
                .where(RoutingDecision.job_id == jobs[key].id).order_by(RoutingDecision.id))]

        statuses = {k: (j.status, j.tier) for k, j in jobs.items()}
        assert statuses == {
            "easy-generate": (JobStatus.SUCCEEDED, "haiku"), "easy-classify": (JobStatus.SUCCEEDED, "haiku"),
            "medium": (JobStatus.SUCCEEDED, "sonnet"), "climbs": (JobStatus.SUCCEEDED, "sonnet"),
            "climbs-twice": (JobStatus.SUCCEEDED, "opus"), "pinned": (JobStatus.SUCCEEDED, "haiku"),
            "doomed": (JobStatus.FAILED, "opus")}, {k: j.error for k, j in jobs.items()}

        # An easy job is triaged, worked and answered by Haiku alone.
        for key in ("easy-generate", "easy-classify"):
            assert moves(key) == [("triage", None, "haiku")]
            assert work_calls(key) == [("haiku", "ok")]
            assert jobs[key].output is not None
        assert jobs["easy-classify"].output["label"] in LABELS
        assert moves("medium") == [("triage", None, "sonnet")] and work_calls("medium") == [("sonnet", "ok")]
        assert moves("pinned") == [("pinned", None, "haiku")] and work_calls("pinned") == [("haiku", "ok")]

        # A failed validation at Haiku: one retry there with the feedback, then up to Sonnet.
        assert moves("climbs") == [("triage", None, "haiku"), ("retry", "haiku", "haiku"),
                                   ("escalation", "haiku", "sonnet")]
        assert work_calls("climbs") == [("haiku", "ok"), ("haiku", "ok"), ("sonnet", "ok")]
        assert moves("climbs-twice")[-2:] == [("retry", "sonnet", "sonnet"), ("escalation", "sonnet", "opus")]
        assert [t for t, _ in work_calls("climbs-twice")] == ["haiku", "haiku", "sonnet", "sonnet", "opus"]
        assert [t for t, _ in work_calls("doomed")] == ["haiku", "haiku", "sonnet", "sonnet", "opus", "opus"]
        assert jobs["doomed"].failure_reason == "validation failed at opus"

        # The per-tier figures: Haiku's line counts the jobs it worked and the ones it passed up.
        summary = summarize(s, cascade, batch_id=report.batch_id)
        tiers = {t.tier: t for t in summary.tiers}
        assert [t.tier for t in summary.tiers] == ["haiku", "sonnet", "opus"]
        assert (tiers["haiku"].jobs, tiers["haiku"].worked, tiers["haiku"].escalations) == (3, 6, 3)
        assert (tiers["sonnet"].worked, tiers["sonnet"].escalations) == (4, 2)
        assert summary.escalations == 5 and summary.top_tier == "opus"
        haiku_work = len([1 for k in jobs for t, _ in work_calls(k) if t == "haiku"])

    # The haiku worker's own metrics count its work, under its queue and its tier. (A stage run is
    # counted just after its hand-off is published: give the last one a moment.)
    # A run hands the job on, or ends it there: a label or schema verdict is decided in the work
    # stage, so an answer that passes it ends the job with no validate hop.
    def runs(m: dict[Any, float]) -> float:
        return sum(m.get(("switchyard_stage_runs_total", (("outcome", outcome), ("queue", "haiku"), ("stage", "work"))),
                         0.0) for outcome in ("handoff", "ended"))

    deadline = time.monotonic() + 10
    while runs(m := haiku_metrics(cluster)) != haiku_work and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runs(m) == haiku_work == 9
    assert m[("switchyard_calls_total", (("outcome", "ok"), ("tier", "haiku")))] == haiku_work

    # `switchyard status` lists the haiku queue, served by its worker.
    out = subprocess.run([SWITCHYARD, "status", "--json"], env=cluster.env(), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    queues = {q["queue"]: q for q in json.loads(out.stdout)["queues"]}
    assert list(queues) == ["triage", "haiku", "sonnet", "opus", "validate"]
    assert (queues["haiku"]["workers"], queues["haiku"]["concurrency"]) == (1, 4)
