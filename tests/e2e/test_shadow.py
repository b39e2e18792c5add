"""Shadow evaluation for real: worker processes for the four queues and the dispatcher, on Postgres
and Redis, calling the fake Claude over HTTP. A batch enqueued with a shadow rate of 1 has every job
that succeeds below the reference tier worked again by the reference tier, its agreement recorded,
its cost kept apart from the job's, and `switchyard quality --json` reports it."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import (
    EVALUATION_STAGES,
    OPEN_SHADOW,
    Job,
    JobStatus,
    ModelCall,
    ShadowEvaluation,
    ShadowStatus,
    Stage,
)
from pipeline.queries.report import summarize
from tests.cli import invoke
from tests.cluster import Cluster, wait_for_batch

LABELS = ["billing", "bug", "account", "other"]
SCHEMA = {"type": "object", "required": ["name", "amount"],
          "properties": {"name": {"type": "string"}, "amount": {"type": "number"}}}


def jobs() -> list[dict]:
    out: list[dict] = []
    for i in range(16):
        # Easy ones end at sonnet and are shadowed; hard ones end at opus, the reference, and are not.
        hint = "[fake:difficulty=hard]" if i % 4 == 3 else "[fake:difficulty=easy]"
        kind = ("classify", "extract", "draft", "generate")[i % 4]
        job: dict = {"key": f"s-{i}", "kind": kind}
        if kind == "classify":
            job |= {"text": f"Ticket {i}: I was charged twice. {hint}", "labels": LABELS}
        elif kind == "extract":
            job |= {"text": f"Receipt {i} for Dana Smith, 42.50 paid. {hint}", "schema": SCHEMA}
        elif kind == "draft":
            job |= {"instructions": f"Apologise for order {i}. {hint}", "context": "Late by 3 days."}
        else:
            job |= {"prompt": f"Summarise item {i} in one line. {hint}"}
        out.append(job)
    # Right only after a retry with the validator's feedback: the routed answer then differs from
    # the reference's (asked without feedback), and the judge must say so.
    out.append({"key": "s-retried", "kind": "draft", "instructions": "Thank the customer [fake:difficulty=easy] "
                "[fake:invalid_once]", "context": "Order 9"})
    return out


@pytest.fixture(scope="module")
def cluster(database_url: str, broker_url: str, fake_claude: FakeClaude, tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake_claude.base_url,
                workdir=tmp_path_factory.mktemp("shadow-cluster"))
    c.start_all(concurrency=4)
    yield c
    c.stop()


def wait_for_shadows(sessions: sessionmaker[Session], batch_id: int, *, timeout: float, cluster: Cluster) -> None:
    """Poll Postgres until no shadow of the batch is still open (a deadline, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as s:
            still = s.scalar(select(ShadowEvaluation.id).join(Job, Job.id == ShadowEvaluation.job_id)
                             .where(Job.batch_id == batch_id, ShadowEvaluation.status.in_(OPEN_SHADOW)).limit(1))
        if still is None:
            return
        time.sleep(0.25)
    raise AssertionError(f"shadows of batch {batch_id} still open after {timeout} s\n{cluster.logs()}")


def test_every_job_below_the_reference_is_shadowed_and_reported(
        cluster: Cluster, sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
        database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shadow.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs()))
    report = enqueue_file(sessions, path, batch="e2e-shadow", config=models, shadow_rate=1.0)
    assert report.batch_id is not None
    wait_for_batch(sessions, report.batch_id, timeout=180, cluster=cluster)
    wait_for_shadows(sessions, report.batch_id, timeout=180, cluster=cluster)
    reference = models.routing.reference

    with sessions() as s:
        rows = s.scalars(select(Job).where(Job.batch_id == report.batch_id)).all()
        shadows = {sh.job_id: sh for sh in s.scalars(select(ShadowEvaluation).where(
            ShadowEvaluation.job_id.in_([j.id for j in rows])))}
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id.in_([j.id for j in rows]))).all()
        summary = summarize(s, models, batch_id=report.batch_id)

    assert all(j.status is JobStatus.SUCCEEDED for j in rows), [(j.key, j.status, j.error) for j in rows]
    below = [j for j in rows if j.tier != reference]
    at_reference = [j for j in rows if j.tier == reference]
    assert below and at_reference  # the batch has both, or the test proves nothing
    # Every job below the reference has its shadow, done, with its agreement; none at the reference.
    assert {j.id for j in below} == set(shadows)
    for j in below:
        sh = shadows[j.id]
        assert sh.status is ShadowStatus.DONE, (j.key, sh.status, sh.error)
        assert sh.rate == 1.0 and 0 <= sh.draw < 1
        assert sh.routed_tier == j.tier and sh.reference_tier == reference and sh.difficulty == j.difficulty
        assert sh.agreement is not None and sh.agreed is not None
        if j.kind.value == "extract":
            assert sh.fields_total and sh.fields_equal is not None
        if j.kind.value in ("draft", "generate"):
            assert sh.judge_reason
    # The fake answers the same prompt the same way on any model, so a job right at its first
    # attempt agrees; the one right only after feedback answered something else, and is judged so.
    retried = next(j for j in rows if j.key == "s-retried")
    assert shadows[retried.id].agreed is False
    assert all(shadows[j.id].agreed for j in below if j.key != "s-retried" and j.attempt == 1)

    # Shadow cost is apart: each job's cost is its own calls' only, and each shadow's its calls'.
    own: dict[int, Decimal] = defaultdict(Decimal)
    evaluation: dict[int, Decimal] = defaultdict(Decimal)
    for c in calls:
        if c.stage in EVALUATION_STAGES:
            evaluation[c.job_id] += c.cost_usd
            assert c.tier == (reference if c.stage is Stage.SHADOW else models.routing.judge)
        else:
            own[c.job_id] += c.cost_usd
    for j in rows:
        assert j.cost_usd == pytest.approx(own[j.id], abs=Decimal("1e-8"))
    for job_id, sh in shadows.items():
        assert evaluation[job_id] > 0
        assert sh.cost_usd == pytest.approx(evaluation[job_id], abs=Decimal("1e-8"))
    assert set(evaluation) == set(shadows)
    # ...and stats do not count it as the jobs' cost.
    assert summary.cost_usd == pytest.approx(sum(j.cost_usd for j in rows), abs=Decimal("1e-6"))

    monkeypatch.setenv("DATABASE_URL", database_url)
    code, out, err = invoke(monkeypatch, capsys, "quality", "--batch", "e2e-shadow", "--json")
    assert code == 0, err
    q = json.loads(out)
    assert q["reference_tier"] == reference
    assert q["succeeded"] == len(rows)
    assert q["shadowed"] == q["evaluated"] == len(below)
    assert Decimal(q["evaluation_cost_usd"]) == pytest.approx(sum(evaluation.values()), abs=Decimal("1e-6"))
    assert Decimal(q["cost_usd"]) == pytest.approx(sum(j.cost_usd for j in rows), abs=Decimal("1e-6"))
    agreed = sum(1 for j in below if shadows[j.id].agreed)
    for stratum in q["strata"]:
        if stratum["tier"] == reference:
            assert stratum["reference"] and stratum["shadowed"] == 0 and stratum["agreement"] == 1.0
        else:
            assert stratum["agreement_low"] <= stratum["agreement"] <= stratum["agreement_high"]
    assert sum(s["agreed"] for s in q["strata"]) == agreed
    assert q["agreement_low"] <= q["agreement"] <= q["agreement_high"]
    assert q["agreement"] < 1  # the retried job disagreed
    assert any("reference tier" in note for note in q["notes"])
