"""The stages as plain functions on Postgres and the fake Claude: no broker involved."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.client import ClaudeClient
from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude
from pipeline.flow import stages
from pipeline.flow.dispatch import dispatch, sweep
from pipeline.flow.stages import Handoff, Pipeline
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobEvent, JobStatus, ModelCall, ValidationVerdict
from tests.conftest import free_form


@pytest.fixture
def pipeline(sessions: sessionmaker[Session], fake_claude: FakeClaude, models: ModelConfig) -> Iterator[Pipeline]:
    client = ClaudeClient(api_key="test", base_url=fake_claude.base_url, attempts=2, sleep=lambda s: None)
    yield Pipeline(sessions=sessions, client=client, models=models, max_deliveries=3)
    client.close()


_n = iter(range(10**6))


def enqueue(p: Pipeline, tmp_path: Path, *jobs: dict) -> list[int]:
    path = tmp_path / f"jobs-{next(_n)}.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    report = enqueue_file(p.sessions, path, batch=path.stem + tmp_path.name, config=p.models)
    with p.sessions() as s:
        return list(s.scalars(select(Job.id).where(Job.batch_id == report.batch_id).order_by(Job.id)))


def dispatched(p: Pipeline) -> list[Handoff]:
    return p.run(lambda s: dispatch(s, max_in_flight=10_000))


def run_to_end(p: Pipeline, handoffs: list[Handoff]) -> None:
    step = {"triage": stages.triage, "work": stages.work, "validate": stages.validate}
    while handoffs:
        h = handoffs.pop()
        nxt = step[h.stage](p, h.job_id)
        if nxt:
            handoffs.append(nxt)


def job(p: Pipeline, job_id: int) -> Job:
    with p.sessions() as s:
        return s.get_one(Job, job_id)


def test_a_job_walks_every_stage(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "classify", "text": "charged twice [fake:difficulty=easy]",
                                         "labels": ["billing", "bug"]})
    handoffs = [h for h in dispatched(pipeline) if h.job_id == jid]
    # Priority 4 on the broker: the default batch priority, 5 (pipeline.flow.admission.message_priority).
    assert handoffs == [Handoff("triage", jid, "triage", priority=4)]
    work = stages.triage(pipeline, jid)
    assert work == Handoff("work", jid, "sonnet")
    # The label check needs no model: the work stage applies it with the answer, no validate hop.
    assert stages.work(pipeline, jid) is None
    assert stages.validate(pipeline, jid) is None  # a stray validate message finds nothing to do
    done = job(pipeline, jid)
    assert done.status is JobStatus.SUCCEEDED and done.output["label"] in ("billing", "bug")
    with pipeline.sessions() as s:
        events = [(e.from_status, e.to_status, e.detail) for e in s.scalars(
            select(JobEvent).where(JobEvent.job_id == jid).order_by(JobEvent.id))]
        verdicts = [(v.tier, v.attempt, v.validator, v.ok) for v in s.scalars(
            select(ValidationVerdict).where(ValidationVerdict.job_id == jid))]
    assert [e[:2] for e in events] == [("queued", "triaging"), ("triaging", "working"), ("working", "succeeded")]
    assert events[-1][2] == "sonnet attempt 1 answered; label ok"
    assert verdicts == [("sonnet", 1, "label", True)]


def test_a_drafts_answer_goes_on_to_the_format_check(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "draft", "instructions": "apologise", "tier": "sonnet"})
    dispatched(pipeline)
    assert stages.work(pipeline, jid) == Handoff("validate", jid, "validate")
    assert stages.validate(pipeline, jid) is None
    assert job(pipeline, jid).status is JobStatus.SUCCEEDED
    with pipeline.sessions() as s:
        stages_called = s.scalars(select(ModelCall.stage).where(ModelCall.job_id == jid).order_by(ModelCall.id)).all()
    assert [str(getattr(x, "value", x)) for x in stages_called] == ["work", "format_check"]


def test_a_classify_job_left_in_validating_is_still_judged(pipeline: Pipeline, tmp_path: Path) -> None:
    """A job a previous version moved to validating with a classify answer (every answer went
    through the validate queue then) is judged there as before, without a model call."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "classify", "text": "left over", "labels": ["billing", "bug"],
                                         "tier": "sonnet"})
    dispatched(pipeline)
    before = job(pipeline, jid)
    pipeline.run(lambda s: stages.transition(s, jid, frm=JobStatus.WORKING, version=before.version,
                                             to=JobStatus.VALIDATING, candidate='{"label": "bug"}',
                                             candidate_stop="end_turn"))
    assert stages.validate(pipeline, jid) is None
    done = job(pipeline, jid)
    assert (done.status, done.output) == (JobStatus.SUCCEEDED, {"label": "bug"})
    with pipeline.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.job_id == jid)) == 0


def test_a_stale_message_moves_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "stale test"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    before = job(pipeline, jid)
    # The same messages delivered again after the job is done: nothing runs, nothing is called.
    with pipeline.sessions() as s:
        calls = s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.job_id == jid))
    for stage in (stages.triage, stages.work, stages.validate):
        assert stage(pipeline, jid) is None
    after = job(pipeline, jid)
    assert (after.version, after.status) == (before.version, before.status)
    with pipeline.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ModelCall).where(ModelCall.job_id == jid)) == calls


@pytest.mark.parametrize("claim_deadline_s", [300.0, 0.0])
def test_two_deliveries_at_once_move_the_job_once(pipeline: Pipeline, tmp_path: Path, claim_deadline_s: float) -> None:
    """A live claim turns the second delivery away before it calls; a claim taken for dead (here:
    a deadline of 0) lets both call, and the version check lets only one move the job."""
    pipeline.claim_deadline_s = claim_deadline_s
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "twice [fake:latency_ms=300]"})
    dispatched(pipeline)
    results: list[Handoff | None] = []
    threads = [threading.Thread(target=lambda: results.append(stages.triage(pipeline, jid))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r is None for r in results) == [False, True]
    with pipeline.sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == jid)).all()
        moves = s.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == jid, JobEvent.from_status == JobStatus.TRIAGING))
    if claim_deadline_s:
        assert [c.applied for c in calls] == [True]
    else:  # both calls happened (unless one thread came late) and cost money; only one moved the job
        assert [c.applied for c in calls].count(True) == 1
    assert moves == 1
    assert job(pipeline, jid).cost_usd == sum(c.cost_usd for c in calls)


@pytest.mark.parametrize(("hint", "structured", "problem"), [
    # Free text: Sonnet names a label that is not one; the label check catches it.
    ("[fake:invalid=sonnet]", False, "label 'none_of_the_above' is not one of ['billing', 'bug']"),
    # Structured outputs: the decoder keeps the label to the enum, but a refusal or a cut still
    # breaks the answer, and validation says which.
    ("[fake:error=refusal@sonnet]", True, "the model refused to answer"),
    ("[fake:error=max_tokens@sonnet]", True, "the answer was cut off at max_tokens"),
])
def test_sonnet_failure_retries_with_feedback_then_escalates(pipeline: Pipeline, tmp_path: Path, hint: str,
                                                             structured: bool, problem: str) -> None:
    p = pipeline if structured else replace(pipeline, models=free_form(pipeline.models))
    [jid] = enqueue(p, tmp_path, {"kind": "classify", "text": f"plan change [fake:difficulty=easy] {hint}",
                                  "labels": ["billing", "bug"]})
    run_to_end(p, [h for h in dispatched(p) if h.job_id == jid])
    done = job(p, jid)
    assert (done.status, done.tier, done.escalations) == (JobStatus.SUCCEEDED, "opus", 1)
    with p.sessions() as s:
        works = s.scalars(select(ModelCall).where(ModelCall.job_id == jid, ModelCall.stage == "work")
                          .order_by(ModelCall.id)).all()
        verdicts = s.scalars(select(ValidationVerdict).where(ValidationVerdict.job_id == jid)
                             .order_by(ValidationVerdict.id)).all()
    assert [w.tier for w in works] == ["sonnet", "sonnet", "opus"]
    assert [(v.tier, v.ok, v.problems) for v in verdicts] == [("sonnet", False, [problem])] * 2 + [("opus", True, [])]


def test_a_permanent_error_fails_the_job_with_the_api_message(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "x [fake:error=400@sonnet]",
                                         "tier": "sonnet"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert done.status is JobStatus.FAILED
    assert "work call to sonnet failed (permanent error): 400 invalid_request_error" in (done.error or "")


def test_a_poison_job_fails_after_bounded_deliveries(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "poison"})
    dispatched(pipeline)
    # As if three workers had died in the middle of this stage.
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id == jid).values(deliveries=3)))
    assert stages.triage(pipeline, jid) is None
    done = job(pipeline, jid)
    assert done.status is JobStatus.FAILED and "poison job" in (done.error or "")
    # The claim that found it poison wrote no started call row: no call was made.
    assert _calls(pipeline, jid) == []


def test_each_stage_of_a_job_under_no_budget_makes_two_statements(pipeline: Pipeline, tmp_path: Path) -> None:
    """The stage's round trips to Postgres are most of what a stage costs beyond its model call:
    the claim writes the call's started row and reads what the stage needs later (whether a budget
    covers the job, the batch's shadow rate), and the result is one statement. A job under no
    budget makes no reservation, and a success under no shadow rate reads nothing more."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "classify", "text": "two statements [fake:difficulty=easy]",
                                         "labels": ["billing", "bug"]})
    dispatched(pipeline)
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement if statement.startswith("SELECT") else statement.split(None, 1)[0])

    event.listen(pipeline.engine, "before_cursor_execute", count)
    try:
        assert stages.triage(pipeline, jid) == Handoff("work", jid, "sonnet")
        triage_statements, statements[:] = list(statements), []
        assert stages.work(pipeline, jid) is None
    finally:
        event.remove(pipeline.engine, "before_cursor_execute", count)
    assert job(pipeline, jid).status is JobStatus.SUCCEEDED
    # The batch's mode (pipeline.flow.economy.mode_of) is read by the first stage of the batch
    # this process runs, then kept.
    assert triage_statements[0] == "WITH" and triage_statements[1].startswith("SELECT batches.mode")
    assert (triage_statements[2:], statements) == (["WITH"], ["WITH", "WITH"])
    assert [(c.stage.value, c.tier, c.outcome, c.applied) for c in _calls(pipeline, jid)] == [
        ("triage", "haiku", "ok", True), ("work", "sonnet", "ok", True)]


def test_the_sweeper_republishes_a_stalled_stage(pipeline: Pipeline, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "lost message"})
    dispatched(pipeline)  # published, then lost: no stage ever runs
    assert jid not in [h.job_id for h in pipeline.run(lambda s: sweep(s, deadline_s=3600, claim_deadline_s=3600))]
    swept = pipeline.run(lambda s: sweep(s, deadline_s=0, claim_deadline_s=3600))
    assert Handoff("triage", jid, "triage") in swept
    run_to_end(pipeline, [Handoff("triage", jid, "triage")])
    assert job(pipeline, jid).status is JobStatus.SUCCEEDED


def _format_checks(p: Pipeline, jid: int) -> list[ModelCall]:
    with p.sessions() as s:
        return list(s.scalars(select(ModelCall).where(ModelCall.job_id == jid, ModelCall.stage == "format_check")
                              .order_by(ModelCall.id)))


def _steps(p: Pipeline, jid: int) -> list[tuple[str, str]]:
    with p.sessions() as s:
        return [(e.from_status, e.to_status) for e in s.scalars(select(JobEvent).where(JobEvent.job_id == jid)
                                                                .order_by(JobEvent.id))]


def test_an_unreadable_format_check_is_made_again(pipeline: Pipeline, tmp_path: Path) -> None:
    """The checker answers garbage once: the check is made again (a move of its own, so it costs
    no delivery), and its readable answer decides."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "draft", "tier": "sonnet",
                                         "instructions": "Apologise [fake:error=malformed@haiku] [fake:times=1]"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert _steps(pipeline, jid) == [("queued", "working"), ("working", "validating"),
                                     ("validating", "validating"), ("validating", "succeeded")]
    checks = _format_checks(pipeline, jid)
    assert [(c.outcome, c.applied) for c in checks] == [("ok", True), ("ok", True)]
    assert done.cost_usd == sum(c.cost_usd for c in checks) + sum(
        c.cost_usd for c in _calls(pipeline, jid) if c.stage == "work")
    with pipeline.sessions() as s:
        verdicts = s.scalars(select(ValidationVerdict).where(ValidationVerdict.job_id == jid)).all()
    assert [(v.validator, v.ok) for v in verdicts] == [("format_check", True)]


def test_a_format_check_unreadable_twice_fails_the_draft(pipeline: Pipeline, tmp_path: Path) -> None:
    """Fail closed: a draft the checker could not judge is not returned unchecked. It goes the way
    of any failed verdict (here pinned to opus: one retry with feedback, then failed)."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "draft", "tier": "opus",
                                         "instructions": "Apologise [fake:error=malformed@haiku]"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert done.status is JobStatus.FAILED
    assert "the format check's answer could not be read, twice" in (done.error or "")
    assert _steps(pipeline, jid).count(("validating", "validating")) == 2  # once per work attempt
    assert len(_format_checks(pipeline, jid)) == 4
    with pipeline.sessions() as s:
        verdicts = s.scalars(select(ValidationVerdict).where(ValidationVerdict.job_id == jid)).all()
    assert [(v.validator, v.ok, v.attempt) for v in verdicts] == [("format_check", False, 1),
                                                                   ("format_check", False, 2)]


def _calls(p: Pipeline, jid: int) -> list[ModelCall]:
    with p.sessions() as s:
        return list(s.scalars(select(ModelCall).where(ModelCall.job_id == jid).order_by(ModelCall.id)))


def test_a_check_again_replayed_after_its_commit_hands_off_once(pipeline: Pipeline, tmp_path: Path) -> None:
    """The move that makes the check again, replayed by Pipeline.run after its commit went through
    (the acknowledgement lost with the connection): the replay hands off again and writes nothing."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "draft", "tier": "sonnet",
                                         "instructions": "Replay [fake:error=malformed@haiku] [fake:times=1]"})
    dispatched(pipeline)
    assert stages.work(pipeline, jid) == Handoff("validate", jid, "validate")
    sent: list[str] = []

    def lose_the_acknowledgement(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "INSERT INTO job_events" in statement:
            sent.append(statement)
            if len(sent) == 1:
                raise OperationalError(statement, parameters, ConnectionError("server closed the connection"))

    event.listen(pipeline.engine, "after_cursor_execute", lose_the_acknowledgement)
    try:
        assert stages.validate(pipeline, jid) == Handoff("validate", jid, "validate")
    finally:
        event.remove(pipeline.engine, "after_cursor_execute", lose_the_acknowledgement)
    assert len(sent) == 1  # the replay found the move applied and did not send it again
    assert _steps(pipeline, jid)[-1] == ("validating", "validating")
    assert [(c.outcome, c.applied) for c in _format_checks(pipeline, jid)] == [("ok", True)]
    assert job(pipeline, jid).cost_usd == sum(c.cost_usd for c in _calls(pipeline, jid))
    assert stages.validate(pipeline, jid) is None
    assert job(pipeline, jid).status is JobStatus.SUCCEEDED
