"""Shadow evaluation as plain functions on Postgres and the fake Claude: no broker involved."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.client import ClaudeClient
from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude
from pipeline.flow import shadow, stages
from pipeline.flow.dispatch import dispatch
from pipeline.flow.stages import Handoff, Pipeline
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, ModelCall, ShadowEvaluation, ShadowStatus, Stage, utcnow
from pipeline.queries.quality import quality

LABELS = ["billing", "bug"]


@pytest.fixture
def pipeline(sessions: sessionmaker[Session], fake_claude: FakeClaude, models: ModelConfig) -> Iterator[Pipeline]:
    client = ClaudeClient(api_key="test", base_url=fake_claude.base_url, attempts=2, sleep=lambda s: None)
    yield Pipeline(sessions=sessions, client=client, models=models, max_deliveries=3)
    client.close()


_n = iter(range(10**6))


def succeed(p: Pipeline, tmp_path: Path, job: dict, *, rate: float | None,
            tenant_id: int | None = None) -> tuple[int, int, Handoff | None]:
    """Enqueue one job into a batch of its own and run it to its end; (batch id, job id, the
    hand-off its success returned)."""
    path = tmp_path / f"shadow-{next(_n)}.jsonl"
    path.write_text(json.dumps(job) + "\n")
    report = enqueue_file(p.sessions, path, batch=path.stem + tmp_path.name, config=p.models, shadow_rate=rate,
                          tenant_id=tenant_id)
    assert report.batch_id is not None
    with p.sessions() as s:
        jid = s.scalars(select(Job.id).where(Job.batch_id == report.batch_id)).one()
    p.run(lambda s: dispatch(s, max_in_flight=10_000))
    step = {"triage": stages.triage, "work": stages.work, "validate": stages.validate}
    h: Handoff | None = Handoff("triage", jid, "triage")
    while h is not None and h.stage in step:
        h = step[h.stage](p, jid)
    with p.sessions() as s:
        assert s.get_one(Job, jid).status is JobStatus.SUCCEEDED
    return report.batch_id, jid, h


def row(p: Pipeline, jid: int) -> ShadowEvaluation | None:
    with p.sessions() as s:
        return s.scalar(select(ShadowEvaluation).where(ShadowEvaluation.job_id == jid))


def calls(p: Pipeline, jid: int, *stage: Stage) -> list[ModelCall]:
    with p.sessions() as s:
        return list(s.scalars(select(ModelCall).where(ModelCall.job_id == jid, ModelCall.stage.in_(stage))
                              .order_by(ModelCall.id)))


def job_cost(p: Pipeline, jid: int) -> Decimal:
    with p.sessions() as s:
        return s.get_one(Job, jid).cost_usd


def test_a_sampled_job_is_recorded_with_its_success_then_compared_off_its_path(pipeline: Pipeline,
                                                                              tmp_path: Path) -> None:
    batch, jid, h = succeed(pipeline, tmp_path, {"kind": "classify", "text": "charged twice [fake:difficulty=easy]",
                                                 "labels": LABELS}, rate=1.0)
    # The job has succeeded, and its sample is on record before any shadow call is made.
    assert h == Handoff("shadow", jid, "opus", priority=9)
    sampled = row(pipeline, jid)
    assert sampled is not None and sampled.status is ShadowStatus.PENDING
    assert (sampled.rate, sampled.routed_tier, sampled.difficulty, sampled.reference_tier) == (1.0, "sonnet", "easy",
                                                                                              "opus")
    assert 0 <= sampled.draw < 1 and sampled.judge_tier is None
    assert calls(pipeline, jid, Stage.SHADOW) == []
    cost = job_cost(pipeline, jid)

    assert shadow.run(pipeline, jid) is None
    done = row(pipeline, jid)
    assert done is not None and done.status is ShadowStatus.DONE
    assert done.agreed is True and done.agreement == 1.0  # the fake answers one prompt alike on any model
    [call] = calls(pipeline, jid, Stage.SHADOW, Stage.JUDGE)
    assert (call.stage, call.tier, call.outcome, call.applied) == (Stage.SHADOW, "opus", "ok", True)
    assert done.cost_usd == call.cost_usd > 0
    assert job_cost(pipeline, jid) == cost  # evaluation cost never joins the job's

    # A repeated message finds nothing to do, and pays for nothing.
    assert shadow.run(pipeline, jid) is None
    assert len(calls(pipeline, jid, Stage.SHADOW, Stage.JUDGE)) == 1

    with pipeline.sessions() as s:
        q = quality(s, pipeline.models, batch_id=batch)
    assert (q.succeeded, q.shadowed, q.evaluated, q.agreement) == (1, 1, 1, 1.0)
    assert q.evaluation_cost_usd == call.cost_usd
    assert q.cost_usd == cost and q.reference_cost_usd > 0


def test_a_draft_is_judged_pairwise_in_a_second_step(pipeline: Pipeline, tmp_path: Path) -> None:
    _, jid, h = succeed(pipeline, tmp_path, {"kind": "draft", "instructions": "Apologise [fake:difficulty=easy]",
                                             "context": "Order 7"}, rate=1.0)
    assert h is not None
    sampled = row(pipeline, jid)
    assert sampled is not None and sampled.judge_tier == "opus"
    assert shadow.run(pipeline, jid) == Handoff("shadow", jid, "opus", priority=9)
    judging = row(pipeline, jid)
    assert judging is not None and judging.status is ShadowStatus.JUDGING and judging.reference_answer
    assert shadow.run(pipeline, jid) is None
    done = row(pipeline, jid)
    assert done is not None and done.status is ShadowStatus.DONE and done.agreed is True
    assert done.judge_reason
    assert [c.stage for c in calls(pipeline, jid, Stage.SHADOW, Stage.JUDGE)] == [Stage.SHADOW, Stage.JUDGE]


def test_not_sampled_at_rate_0_nor_at_the_reference_tier(pipeline: Pipeline, tmp_path: Path) -> None:
    batch, jid, h = succeed(pipeline, tmp_path, {"kind": "generate", "prompt": "Hi [fake:difficulty=easy]"}, rate=0)
    assert h is None and row(pipeline, jid) is None
    _, jid, h = succeed(pipeline, tmp_path, {"kind": "generate", "prompt": "Hi [fake:difficulty=hard]"}, rate=1.0)
    assert h is None and row(pipeline, jid) is None
    with pipeline.sessions() as s:
        q = quality(s, pipeline.models, batch_id=batch)
    # Nothing shadowed: an answer that says so, not a division by zero.
    assert (q.succeeded, q.shadowed, q.agreement, q.agreement_low) == (1, 0, None, None)
    assert any("no job below the reference tier has a shadow result yet" in n for n in q.notes)
    assert q.to_dict()["strata"][0]["agreement"] is None


def test_a_reference_that_fails_the_jobs_checks_fails_the_shadow(pipeline: Pipeline, tmp_path: Path) -> None:
    _, jid, _h = succeed(pipeline, tmp_path, {"kind": "classify", "labels": LABELS,
                                              "text": "x [fake:difficulty=easy] [fake:error=refusal@opus]"}, rate=1.0)
    assert shadow.run(pipeline, jid) is None
    failed = row(pipeline, jid)
    assert failed is not None and failed.status is ShadowStatus.FAILED and failed.agreed is None
    assert failed.error is not None and failed.error.startswith("the reference answer did not pass validation")


def test_the_sweep_republishes_a_lost_step_and_a_dead_workers_claim(pipeline: Pipeline, tmp_path: Path) -> None:
    _, lost, _ = succeed(pipeline, tmp_path, {"kind": "classify", "labels": LABELS,
                                              "text": "lost [fake:difficulty=easy]"}, rate=1.0)
    _, dead, _ = succeed(pipeline, tmp_path, {"kind": "classify", "labels": LABELS,
                                              "text": "dead [fake:difficulty=easy]"}, rate=1.0)
    now = utcnow()
    with pipeline.sessions() as s, s.begin():
        # One step's message was lost an hour ago; another's worker claimed it and died, mid-call.
        s.execute(update(ShadowEvaluation).where(ShadowEvaluation.job_id == lost)
                  .values(updated_at=now - timedelta(hours=1)))
        s.execute(update(ShadowEvaluation).where(ShadowEvaluation.job_id == dead)
                  .values(status=ShadowStatus.WORKING, claimed_at=now - timedelta(hours=1), deliveries=1))
        s.add(ModelCall(job_id=dead, stage=Stage.SHADOW, tier="opus", model="m", outcome="started", started_at=now))
    swept = pipeline.run(lambda s: shadow.sweep(s, deadline_s=600, claim_deadline_s=300, now=now))
    assert {h.job_id for h in swept} >= {lost, dead}
    assert all(h.priority == 9 and h.queue == "opus" for h in swept)
    # Swept again at once, nothing is sent twice: its clock restarted.
    again = pipeline.run(lambda s: shadow.sweep(s, deadline_s=600, claim_deadline_s=300, now=now))
    assert not {h.job_id for h in again} & {lost, dead}
    for jid in (lost, dead):
        # The republished step runs; the dead worker's call is closed as abandoned.
        assert shadow.run(pipeline, jid) is None
        done = row(pipeline, jid)
        assert done is not None and done.status is ShadowStatus.DONE
    with pipeline.sessions() as s:
        outcomes = s.scalars(select(ModelCall.outcome).where(ModelCall.job_id == dead, ModelCall.stage == Stage.SHADOW)
                             .order_by(ModelCall.id)).all()
        assert s.scalar(select(func.count()).select_from(ShadowEvaluation)
                        .where(ShadowEvaluation.job_id == dead)) == 1
    assert outcomes[0] == "abandoned" and outcomes[-1] == "ok"


def test_quality_prints_its_table_and_says_when_nothing_was_shadowed(
        pipeline: Pipeline, tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.cli import invoke

    batch, jid, _ = succeed(pipeline, tmp_path, {"kind": "extract", "text": "Dana paid 42.50 [fake:difficulty=easy]",
                                                 "schema": {"type": "object", "properties": {
                                                     "name": {"type": "string"}}}}, rate=1.0)
    assert shadow.run(pipeline, jid) is None
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = invoke(monkeypatch, capsys, "quality", "--batch", str(batch))
    assert code == 0, err
    assert "agreement with opus" in out
    assert "estimated agreement with opus: 100.0% (95% interval" in out
    assert "from 1 shadowed job(s) of 1 succeeded" in out and "evaluation cost $" in out

    quiet, _, _ = succeed(pipeline, tmp_path, {"kind": "generate", "prompt": "Hi [fake:difficulty=easy]"}, rate=0)
    code, out, err = invoke(monkeypatch, capsys, "quality", "--batch", str(quiet))
    assert code == 0, err
    assert "agreement with the reference: not estimated (no shadowed job has a result)" in out
    assert "set shadow_rate" in " ".join(out.split())


def test_a_tasks_rate_samples_its_jobs_and_a_batchs_rate_overrides_it(pipeline: Pipeline, tmp_path: Path) -> None:
    from pipeline.intake import tasks

    name = f"shadowed-{next(_n)}-{tmp_path.name}"[:100]
    spec = tasks.parse_task({"name": name, "kind": "generate", "instructions": "Answer briefly.", "shadow_rate": 1},
                            work_tiers=pipeline.models.work_tiers)
    with pipeline.sessions() as s, s.begin():
        tasks.apply(s, spec, tenant_id=None)
    # The configuration's rate is 0: only the task's can sample this job.
    assert pipeline.models.routing.shadow_rate == 0
    _, jid, h = succeed(pipeline, tmp_path, {"task": name, "prompt": "Hi [fake:difficulty=easy]"}, rate=None)
    assert h == Handoff("shadow", jid, "opus", priority=9)
    sampled = row(pipeline, jid)
    assert sampled is not None and sampled.rate == 1.0
    _, jid, h = succeed(pipeline, tmp_path, {"task": name, "prompt": "Hello [fake:difficulty=easy]"}, rate=0)
    assert h is None and row(pipeline, jid) is None


def test_a_shadow_step_is_published_to_its_queues_lowest_priority_list(broker_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from pipeline.queries.ops import PRIORITY_SEP
    from pipeline.settings import Settings
    from workers.base import publisher
    from workers.config import make_app

    monkeypatch.setenv("BROKER_URL", broker_url)
    app = make_app(Settings())
    queue = f"shadow-test-{next(_n)}"
    client = redis.Redis.from_url(broker_url)
    try:
        publisher(app)([Handoff("work", 1, queue), shadow.handoff(2, queue)])
        # kombu's Redis consumer pops a queue's lists in priority order: the base list (the job's
        # stage) first, the shadow's last.
        assert client.llen(queue) == 1
        assert client.llen(f"{queue}{PRIORITY_SEP}9") == 1
    finally:
        client.delete(queue, f"{queue}{PRIORITY_SEP}9")


def test_shadows_find_the_answers_a_weaker_tier_got_wrong(sessions: sessionmaker[Session], models: ModelConfig,
                                                          tmp_path: Path) -> None:
    from pipeline.fake_claude import FakeOptions

    # Sonnet errs on every easy job (a wrong answer that still passes validation); Opus never does.
    options = FakeOptions(error_rates={"sonnet": {"easy": 1.0}})
    with FakeClaude(port=0, options=options) as fake:
        client = ClaudeClient(api_key="test", base_url=fake.base_url, attempts=2, sleep=lambda s: None)
        p = Pipeline(sessions=sessions, client=client, models=models, max_deliveries=3)
        try:
            _, label_job, _ = succeed(p, tmp_path, {"kind": "classify", "labels": ["billing", "bug", "account"],
                                                    "text": "Refund my billing error [fake:difficulty=easy]"},
                                      rate=1.0)
            _, field_job, _ = succeed(p, tmp_path, {"kind": "extract", "text": "Paid in full [fake:difficulty=easy]",
                                                    "schema": {"type": "object", "required": ["status", "note"],
                                                               "properties": {
                                                                   "status": {"enum": ["paid", "unpaid", "late"]},
                                                                   "note": {"type": "string"}}}},
                                      rate=1.0)
            for jid in (label_job, field_job):
                assert shadow.run(p, jid) is None
        finally:
            client.close()
    label, fields = row(p, label_job), row(p, field_job)
    assert label is not None and label.status is ShadowStatus.DONE and label.agreed is False
    assert fields is not None and fields.status is ShadowStatus.DONE and fields.agreed is False
    assert fields.fields_total == 2 and fields.fields_equal == 1 and fields.agreement == 0.5


def test_a_record_replayed_after_a_lost_commit_acknowledgement_counts_nothing_twice(pipeline: Pipeline,
                                                                                    tmp_path: Path) -> None:
    from pipeline.claude.client import Attempt
    from pipeline.claude.pricing import Usage
    from pipeline.flow.states import Claim

    _, jid, _ = succeed(pipeline, tmp_path, {"kind": "classify", "labels": LABELS,
                                             "text": "replayed [fake:difficulty=easy]"}, rate=1.0)
    c = pipeline.run(lambda s: shadow.begin(s, jid, claim_deadline_s=300, now=utcnow()))
    assert c is not None and c.status is ShadowStatus.WORKING
    with pipeline.sessions() as s, s.begin():
        call = ModelCall(job_id=jid, stage=Stage.SHADOW, tier="opus", model="m", outcome="started", started_at=utcnow())
        s.add(call)
        s.flush()
        call_id = call.id
    at = utcnow()
    attempts = [Attempt(number=1, started_at=at, finished_at=at, latency_ms=1.0, ok=True, usage=Usage(1000, 100),
                        text='{"label": "billing"}')]
    snap = Claim(id=jid, version=0, deliveries=1, kind="classify", payload={}, tier="opus", attempt=1, feedback=None,
                 candidate=None, candidate_stop=None)

    def record(replay: bool) -> bool:
        with pipeline.engine.begin() as conn:
            conn.execution_options(**{stages.REPLAY: replay})
            return shadow._record(conn, pipeline, c, call_id, snap, Stage.SHADOW, "opus", attempts,
                                  to=ShadowStatus.DONE, values={"agreement": 1.0, "agreed": True})

    assert record(False) is True
    first = row(pipeline, jid)
    assert first is not None and first.status is ShadowStatus.DONE and first.cost_usd > 0
    # The same unit run again, as after a connection lost before the commit's acknowledgement.
    assert record(True) is True
    again = row(pipeline, jid)
    assert again is not None and again.cost_usd == first.cost_usd
    assert [x.outcome for x in calls(pipeline, jid, Stage.SHADOW)] == ["ok"]


def test_a_claim_replayed_with_its_own_stamp_is_taken_again_and_counted_once(pipeline: Pipeline,
                                                                             tmp_path: Path) -> None:
    _, jid, _ = succeed(pipeline, tmp_path, {"kind": "classify", "labels": LABELS,
                                             "text": "claimed twice [fake:difficulty=easy]"}, rate=1.0)
    now = utcnow()
    first = pipeline.run(lambda s: shadow.begin(s, jid, claim_deadline_s=300, now=now))
    replayed = pipeline.run(lambda s: shadow.begin(s, jid, claim_deadline_s=300, now=now))
    rival = pipeline.run(lambda s: shadow.begin(s, jid, claim_deadline_s=300, now=now + timedelta(seconds=1)))
    assert first is not None and replayed is not None
    assert (replayed.version, replayed.deliveries) == (first.version, first.deliveries) == (1, 1)
    assert rival is None  # another delivery, while the claim is live: refused


def test_a_shadow_call_reserves_against_the_tenants_daily_limit_and_waits_when_it_has_no_room(
        pipeline: Pipeline, tmp_path: Path) -> None:
    """The tenant's daily limit covers every call its work makes, evaluation included: a shadow's
    call reserves against it (never against the batch's budget), waits when it does not fit
    (the job keeps its answer; nothing is paused), and adds its actual cost to the day's spend."""
    from pipeline import tenants
    from pipeline.models import BudgetReservation, Tenant, TenantSpendDay

    with pipeline.sessions() as s:
        tenant_id = tenants.get_or_create(s, f"shadow-limit-{next(_n)}").id
        s.commit()
    _, jid, _ = succeed(pipeline, tmp_path, {"kind": "classify", "text": "charged twice [fake:difficulty=easy]",
                                             "labels": LABELS}, rate=1.0, tenant_id=tenant_id)
    with pipeline.sessions() as s:
        spent = tenants.spend_today(s, tenant_id)
        # Room for less than the reference call's worst case (its whole max_tokens at Opus's price).
        s.execute(update(Tenant).where(Tenant.id == tenant_id)
                  .values(max_spend_per_day_usd=spent + Decimal("0.001")))
        s.commit()
    before = utcnow()
    assert shadow.run(pipeline, jid) is None
    after = utcnow()
    waiting = row(pipeline, jid)
    assert waiting is not None and waiting.status is ShadowStatus.PENDING
    # It waits RESERVE_RETRY_S, or until the day's limit renews at 00:00 UTC if that comes first (a
    # fixed "more than five minutes away" failed every run between 23:55 and midnight).

    def wakes(t: datetime) -> datetime:
        return min(t + timedelta(seconds=shadow.RESERVE_RETRY_S), tenants.day_start(t) + timedelta(days=1))

    assert waiting.not_before is not None and wakes(before) <= waiting.not_before <= wakes(after)
    assert not calls(pipeline, jid, Stage.SHADOW)
    with pipeline.sessions() as s:
        assert not s.scalar(select(func.count()).select_from(BudgetReservation).where(
            BudgetReservation.job_id == jid, BudgetReservation.released_at.is_(None)))
        assert s.get_one(Job, jid).status is JobStatus.SUCCEEDED  # the job keeps its answer
        # The limit raised and the wait over (what the dispatcher's sweep publishes): it is made.
        s.execute(update(Tenant).where(Tenant.id == tenant_id).values(max_spend_per_day_usd=100))
        s.execute(update(ShadowEvaluation).where(ShadowEvaluation.job_id == jid).values(not_before=None))
        s.commit()
        day_before = s.scalar(select(TenantSpendDay.spent_usd).where(TenantSpendDay.tenant_id == tenant_id))
    assert shadow.run(pipeline, jid) is None
    made = calls(pipeline, jid, Stage.SHADOW)
    assert row(pipeline, jid).status is ShadowStatus.DONE  # type: ignore[union-attr]
    assert len(made) == 1 and made[0].cost_usd > 0
    with pipeline.sessions() as s:
        hold = s.scalars(select(BudgetReservation).where(BudgetReservation.call_id == made[0].id)).one()
        day_after = s.scalar(select(TenantSpendDay.spent_usd).where(TenantSpendDay.tenant_id == tenant_id))
    assert hold.batch_id is None and hold.released_at is not None and hold.cost_usd == made[0].cost_usd
    assert day_after == day_before + made[0].cost_usd
