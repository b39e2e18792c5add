"""The whole pipeline, for real: worker processes for the four queues and the dispatcher, on
Postgres and Redis, calling the fake Claude over HTTP through the official SDK."""

from __future__ import annotations

import json
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench.jobs import job_of_kind
from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude
from pipeline.flow.routing import parse_triage, tier_for
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Batch, Job, JobKind, JobStatus, ModelCall, RoutingDecision, Stage, ValidationVerdict
from pipeline.queries.report import summarize
from tests.cluster import Cluster, wait_for_batch
from tests.conftest import free_form_config_file
from tests.listener import listening

LABELS = ["billing", "bug", "account", "other"]
SCHEMA = {"type": "object", "required": ["name", "amount"],
          "properties": {"name": {"type": "string"}, "amount": {"type": "number", "minimum": 0},
                         "paid": {"type": "boolean"}}}


# Triage says easy, so the job goes to Sonnet; every Sonnet answer fails validation, the retry
# with feedback too; so the job must move up to Opus, whose answer passes. A free-text answer fails
# by being wrong; under structured outputs the decoder keeps classify and extract answers to their
# schema, so there they fail the way it still lets them: a refusal (a cut at max_tokens would do too,
# tests/unit/test_stages.py has it, but its full max_tokens of output would swamp the cost figures
# below). Drafts are free text either way, judged by the format check.
EASY = "[fake:difficulty=easy]"
ESCALATES = {
    "structured": {"classify": f"{EASY} [fake:error=refusal@sonnet]", "extract": f"{EASY} [fake:error=refusal@sonnet]",
                   "draft": f"{EASY} [fake:invalid=sonnet]", "generate": f"{EASY} [fake:invalid=sonnet]"},
    "free-form": dict.fromkeys(("classify", "extract", "draft", "generate"), f"{EASY} [fake:invalid=sonnet]"),
}
# A triage answer that is no verdict: garbage in free text; under structured outputs, a refusal
# (once: the draft's format check, also Haiku's, then answers on its second try).
NO_VERDICT = {"structured": "[fake:error=refusal@haiku] [fake:times=1]", "free-form": "[fake:triage=garbage]"}
# Fails validation at every tier.
DOOMED = {"structured": "[fake:error=refusal@sonnet,opus]", "free-form": "[fake:invalid=all]"}


def mixed_jobs(n: int, seed: int = 1, *, mode: str = "structured") -> list[dict]:
    """A realistic mix, with some jobs steered: hard ones, easy ones that Sonnet gets wrong (so
    they must escalate), ones that need one retry, unsure or unreadable triage verdicts, pinned
    tiers, and a few that cannot succeed."""
    rng = random.Random(seed)
    jobs: list[dict] = []
    for i in range(n):
        hint = rng.choice(["", "", "", "", "[fake:difficulty=hard]", "ESCALATES", "[fake:invalid_once]",
                           "[fake:confidence=0.2]", NO_VERDICT[mode], "[fake:difficulty=easy]"])
        kind = ("classify", "extract", "draft", "generate")[i % 4]
        hint = ESCALATES[mode][kind] if hint == "ESCALATES" else hint
        job = job_of_kind(i, kind, hint, labels=LABELS, schema=SCHEMA)
        if i % 25 == 0:
            job["tier"] = "opus" if i % 50 == 0 else "sonnet"
        jobs.append(job)
    # Two that fail validation everywhere: they must end failed, with reasons.
    jobs.append({"key": "doomed-1", "kind": "classify", "text": f"Nothing fits {DOOMED[mode]}", "labels": LABELS})
    jobs.append({"key": "doomed-2", "kind": "generate", "prompt": "Write nonsense [fake:invalid=all]"})
    return jobs


def escalates(job: Job, mode: str) -> bool:
    return ESCALATES[mode][job.kind.value] in json.dumps(job.payload)


@pytest.fixture(scope="module", params=["structured", "free-form"])
def mode(request: pytest.FixtureRequest) -> str:
    """The whole module runs twice: with the bundled configuration (structured outputs at every
    tier), and with structured outputs off, where free-text answers meet validation alone."""
    return str(request.param)


@pytest.fixture(scope="module")
def cluster(database_url: str, broker_url: str, fake_claude: FakeClaude, tmp_path_factory: pytest.TempPathFactory,
            mode: str):
    workdir = tmp_path_factory.mktemp("cluster")
    env = {} if mode == "structured" else {
        "SWITCHYARD_CONFIG": str(free_form_config_file(workdir / "free-form.toml"))}
    c = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake_claude.base_url,
                workdir=workdir, env_extra=env)
    c.start_all(concurrency=8)
    yield c
    c.stop()


def test_two_hundred_mixed_jobs_end_to_end(cluster: Cluster, sessions: sessionmaker[Session], models: ModelConfig,
                                           fake_claude: FakeClaude, tmp_path: Path, mode: str) -> None:
    jobs = mixed_jobs(198, mode=mode)
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))

    report = enqueue_file(sessions, path, batch=f"e2e-mixed-{mode}", config=models)
    assert report.accepted == 200 and report.batch_id is not None
    wait_for_batch(sessions, report.batch_id, timeout=180, cluster=cluster)

    with sessions() as s:
        rows = s.scalars(select(Job).where(Job.batch_id == report.batch_id)).all()
        by_key = {j.key: j for j in rows}

        # Every job is terminal; only the doomed ones failed, and they say why.
        statuses = Counter(j.status for j in rows)
        assert statuses[JobStatus.FAILED] == 2, {j.key: j.error for j in rows if j.status is JobStatus.FAILED}
        assert statuses[JobStatus.SUCCEEDED] == 198
        for key in ("doomed-1", "doomed-2"):
            assert "validation failed at opus" in (by_key[key].error or "")

        # Each triaged job's first work tier is what the policy makes of its triage answer.
        for job in rows:
            decisions = s.scalars(select(RoutingDecision).where(RoutingDecision.job_id == job.id)
                                  .order_by(RoutingDecision.id)).all()
            first_work = s.scalars(select(ModelCall).where(ModelCall.job_id == job.id, ModelCall.stage == Stage.WORK)
                                   .order_by(ModelCall.id)).first()
            assert first_work is not None
            if job.pinned_tier:
                assert decisions[0].reason_kind == "pinned" and first_work.tier == job.pinned_tier
                continue
            triage_call = s.scalars(select(ModelCall).where(ModelCall.job_id == job.id,
                                                            ModelCall.stage == Stage.TRIAGE)).one()
            verdict = parse_triage(triage_call.response_text, min_confidence=models.routing.min_confidence,
                                   stop_reason=triage_call.stop_reason)
            assert decisions[0].reason_kind == "triage"
            assert decisions[0].verdict == verdict.difficulty == job.difficulty
            # What triage named, before the threshold: an unsure verdict is routed as ambiguous, and
            # keeps the difficulty it named.
            assert decisions[0].triaged_as == verdict.triaged_as
            if "[fake:confidence=0.2]" in json.dumps(job.payload):
                assert decisions[0].verdict == "ambiguous", job.key
                assert decisions[0].triaged_as in ("easy", "medium", "hard"), job.key
            assert decisions[0].to_tier == tier_for(verdict, models.routing) == first_work.tier

        # Steered jobs took the path their hints force. Those steered to fail at Sonnet went there,
        # were retried there once with the validator's feedback, then escalated to Opus.
        retries = [("retry", "sonnet", "sonnet")] * models.routing.retries_per_tier
        escalated = [j for j in rows if escalates(j, mode) and not j.pinned_tier]
        assert len(escalated) >= 10
        for job in escalated:
            moves = s.execute(select(RoutingDecision.reason_kind, RoutingDecision.from_tier, RoutingDecision.to_tier)
                              .where(RoutingDecision.job_id == job.id).order_by(RoutingDecision.id)).all()
            assert job.difficulty == "easy", job.key
            assert [tuple(m) for m in moves] == [("triage", None, "sonnet"), *retries,
                                                  ("escalation", "sonnet", "opus")], (job.key, moves)
            assert (job.status, job.tier, job.escalations) == (JobStatus.SUCCEEDED, "opus", 1), job.key
        for job in rows:
            text = json.dumps(job.payload)
            if escalates(job, mode) and job.pinned_tier == "opus":
                assert (job.status, job.tier, job.escalations) == (JobStatus.SUCCEEDED, "opus", 0), job.key
            if (NO_VERDICT[mode] in text or "[fake:confidence=0.2]" in text) and not job.pinned_tier:
                assert job.difficulty == "ambiguous" and first_tier(s, job.id) == "opus"

        # Escalations happened exactly where validation failed with the retry used up.
        for job in rows:
            verdicts = s.scalars(select(ValidationVerdict).where(ValidationVerdict.job_id == job.id)
                                 .order_by(ValidationVerdict.id)).all()
            escalations = s.scalars(select(RoutingDecision).where(RoutingDecision.job_id == job.id,
                                                                  RoutingDecision.reason_kind == "escalation")).all()
            expected = [v for v in verdicts if not v.ok and v.tier == "sonnet"
                        and v.attempt > models.routing.retries_per_tier]
            story = [(v.tier, v.attempt, v.ok, v.problems) for v in verdicts]
            assert len(escalations) == len(expected) == job.escalations, (job.key, story, job.error)
            assert verdicts[-1].ok == (job.status is JobStatus.SUCCEEDED)
        assert sum(j.escalations for j in rows) > 0

        # The money adds up: each call's cost is its tokens at its tier's price, each job's cost is
        # the sum of its calls, and the summary is the sum of the jobs.
        calls = s.scalars(select(ModelCall).join(Job).where(Job.batch_id == report.batch_id)).all()
        for c in calls:
            usage = Usage(c.input_tokens, c.output_tokens, c.cache_creation_input_tokens, c.cache_read_input_tokens)
            expected_cost = call_cost(models.tier(c.tier), usage, config=models) if c.outcome == "ok" else 0
            assert c.cost_usd == pytest.approx(Decimal(expected_cost), abs=Decimal("1e-8"))
            assert c.model == models.tier(c.tier).model
            assert c.request_id and c.request_id.startswith("req_")
        per_job = Counter()
        for c in calls:
            per_job[c.job_id] += c.cost_usd
        for job in rows:
            assert job.cost_usd == pytest.approx(per_job[job.id], abs=Decimal("1e-8"))
        summary = summarize(s, models, batch_id=report.batch_id)
        assert summary.cost_usd == pytest.approx(sum(j.cost_usd for j in rows), abs=Decimal("1e-6"))
        assert sum(t.calls for t in summary.tiers) == len(calls)
        assert sum(t.input_tokens for t in summary.tiers) == sum(c.input_tokens for c in calls)
        assert summary.top_tier_cost_usd > summary.cost_usd > 0

        # Every recorded call went over HTTP to the fake: its log has each request id.
        logged = {r["request_id"]: r["output_format"] for r in fake_claude.requests()}
        assert {c.request_id for c in calls} <= logged.keys()
        # ...and asked for structured outputs where the mode has them: all but the drafts' work.
        kinds = {j.id: j.kind for j in rows}
        for c in calls:
            asks = c.stage is not Stage.WORK or kinds[c.job_id] in (JobKind.CLASSIFY, JobKind.EXTRACT)
            assert (logged[c.request_id] is not None) == (asks and mode == "structured"), (c.stage, kinds[c.job_id])
        assert s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.outcome == "started")) == 0


def test_a_schema_stored_before_the_checks_fails_with_a_reason(cluster: Cluster, sessions: sessionmaker[Session],
                                                               tmp_path: Path, mode: str) -> None:
    """Jobs written straight to Postgres, as if submitted before schemas were checked: the validate
    worker reads no file, sends no request, and fails each job at once with the reason, instead
    of crashing the stage and leaving the job in `validating`."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"type": "string", "enum": ["leaked-enum-value"]}))
    with listening() as listener:
        schemas = {
            "file": ({"type": "object", "properties": {"name": {"$ref": secret.as_uri()}}}, secret.as_uri()),
            "http": ({"$ref": f"{listener.url}/remote.json"}, f"{listener.url}/remote.json"),
            "id-relative": ({"$id": f"{listener.url}/root.json", "properties": {"name": {"$ref": "other.json"}}},
                            "other.json"),
            "dynamic": ({"$dynamicRef": f"{listener.url}/dynamic.json#meta"}, f"{listener.url}/dynamic.json#meta"),
            "dangling": ({"type": "object", "properties": {"name": {"$ref": "#/$defs/missing"}}}, "#/$defs/missing"),
            "backreference": ({"type": "object", "properties": {"name": {"type": "string", "pattern": "(a)\\1"}}},
                              "(a)\\1"),
        }
        with sessions.begin() as s:
            batch = Batch(name=f"e2e-unconfined-schemas-{mode}")
            s.add(batch)
            s.flush()
            s.add_all([Job(batch_id=batch.id, key=key, kind=JobKind.EXTRACT, pinned_tier="sonnet",
                           payload={"text": "Receipt for Dana Smith, 42.50 paid.", "schema": schema})
                       for key, (schema, _) in schemas.items()])
            batch_id = batch.id
        wait_for_batch(sessions, batch_id, timeout=90, cluster=cluster)
        assert listener.requests == []

    with sessions() as s:
        jobs = {j.key: j for j in s.scalars(select(Job).where(Job.batch_id == batch_id))}
        for key, (_, named) in schemas.items():
            job = jobs[key]
            assert job.status is JobStatus.FAILED, (key, job.status, job.error)
            # One answer, one verdict: no other attempt or tier could pass a schema that cannot be used.
            assert job.error and job.error.startswith("validation failed at sonnet after 1 attempt(s): the schema"), \
                (key, job.error)
            assert repr(named) in job.error and "leaked" not in job.error, (key, job.error)
            verdicts = s.scalars(select(ValidationVerdict).where(ValidationVerdict.job_id == job.id)).all()
            assert [(v.ok, v.validator) for v in verdicts] == [(False, "json_schema")]
            assert s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.job_id == job.id,
                                                                              ModelCall.stage == Stage.WORK)) == 1


def first_tier(s: Session, job_id: int) -> str | None:
    return s.scalar(select(RoutingDecision.to_tier).where(RoutingDecision.job_id == job_id)
                    .order_by(RoutingDecision.id).limit(1))
