"""Stage claims and the sweeper's two deadlines, on Postgres with no broker: what lets a killed
worker's jobs come back fast without republishing healthy queued work, and keeps a poison job from
taking innocent jobs down with it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import OperationalError

from pipeline import stages
from pipeline.dispatch import sweep
from pipeline.models import Job, JobEvent, JobStatus, ModelCall, RoutingDecision, ValidationVerdict, utcnow
from pipeline.stages import Handoff, Pipeline
from pipeline.states import begin_stage
from tests.unit.test_stages import dispatched, enqueue, job, pipeline  # noqa: F401  (the fixture)


def _age_claim(p: Pipeline, jid: int, seconds: float) -> None:
    stale = utcnow() - timedelta(seconds=seconds)
    p.run(lambda s: s.execute(update(Job).where(Job.id == jid).values(claimed_at=stale)))


def _swept(p: Pipeline, **kw: object) -> list[int]:
    return [h.job_id for h in p.run(lambda s: sweep(s, **{"deadline_s": 3600, "claim_deadline_s": 60, **kw}))]


def test_a_duplicate_message_is_refused_while_a_live_worker_holds_the_stage(pipeline: Pipeline,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "dup"})
    dispatched(pipeline)
    first = pipeline.run(lambda s: begin_stage(s, jid, status=JobStatus.TRIAGING, claim_deadline_s=60))
    assert first is not None
    assert first.deliveries == 1
    # A second delivery (sweeper, visibility timeout) while the first is alive: no call, no count.
    assert pipeline.run(lambda s: begin_stage(s, jid, status=JobStatus.TRIAGING, claim_deadline_s=60)) is None
    assert job(pipeline, jid).deliveries == 1
    # Once the claim is stale, the worker is presumed dead and another delivery may take over.
    _age_claim(pipeline, jid, 61)
    again = pipeline.run(lambda s: begin_stage(s, jid, status=JobStatus.TRIAGING, claim_deadline_s=60))
    assert again is not None
    assert again.deliveries == 2


def test_a_dead_claim_is_swept_after_the_short_deadline_and_queued_work_is_left_alone(
        pipeline: Pipeline, tmp_path: Path) -> None:  # noqa: F811
    held, waiting = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "held"},
                            {"kind": "generate", "prompt": "waiting"})
    dispatched(pipeline)
    pipeline.run(lambda s: begin_stage(s, held, status=JobStatus.TRIAGING, claim_deadline_s=60))
    assert held not in _swept(pipeline)
    _age_claim(pipeline, held, 61)
    # The unclaimed one has waited only seconds: it is left in its queue.
    swept = _swept(pipeline)
    assert held in swept
    assert waiting not in swept
    assert job(pipeline, held).claimed_at is None
    # ...unless the broker lost its data, when every stage left unclaimed is republished at once.
    assert waiting in _swept(pipeline, lost_before=utcnow())


def test_claiming_a_stage_closes_the_dead_claims_calls(pipeline: Pipeline, tmp_path: Path) -> None:  # noqa: F811
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "orphan", "tier": "sonnet"})
    dispatched(pipeline)
    claimed = stages._claim(pipeline, jid, JobStatus.WORKING, lambda c: (stages.Stage.WORK, "sonnet"))
    assert claimed is not None
    _age_claim(pipeline, jid, 10_000)  # its worker died mid-call
    # A duplicate message takes over before any sweep: the dead call is closed, the job finishes.
    assert stages.work(pipeline, jid) == Handoff("validate", jid, "validate")
    with pipeline.sessions() as s:
        outcomes = [(c.delivery, c.outcome) for c in s.scalars(select(ModelCall).where(ModelCall.job_id == jid)
                                                                .order_by(ModelCall.id))]
    assert outcomes == [(1, "abandoned"), (2, "ok")]


def test_suspects_are_republished_one_at_a_time_per_queue(pipeline: Pipeline, tmp_path: Path) -> None:  # noqa: F811
    a, b = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "a", "tier": "opus"},
                   {"kind": "generate", "prompt": "b", "tier": "opus"})
    dispatched(pipeline)
    # Both died twice on the opus queue (one of them may be killing the worker).
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id.in_([a, b]))
                                     .values(deliveries=2, claimed_at=utcnow() - timedelta(hours=1))))
    first = [j for j in _swept(pipeline) if j in (a, b)]
    assert len(first) == 1
    # While that one runs, the other waits on probation.
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id == first[0]).values(claimed_at=utcnow())))
    assert not [j for j in _swept(pipeline) if j in (a, b)]
    # When it is done, the other goes.
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id == first[0]).values(claimed_at=None)))
    assert stages.work(pipeline, first[0]) is not None
    assert [j for j in _swept(pipeline) if j in (a, b)] == [b if first[0] == a else a]


# Each stage's result, replayed: the job (pinned to sonnet unless it is triaged), the stages run
# before the one under test, that stage, where its result hands the job, and the stage of its call
# (None: a deterministic verdict makes no call). A failed validation hands the job back to work, so
# a dropped hand-off shows.
_SCHEMA = {"type": "object", "required": ["invoice"], "properties": {"invoice": {"type": "string"}}}
REPLAYS = {
    "triage": ({"kind": "generate", "prompt": "replayed [fake:difficulty=easy]"}, [], "triage",
               ("work", "sonnet"), JobStatus.WORKING, "triage"),
    "work": ({"kind": "generate", "prompt": "replayed", "tier": "sonnet"}, [], "work",
             ("validate", "validate"), JobStatus.VALIDATING, "work"),
    "validate, classify label": (
        {"kind": "classify", "text": "replayed [fake:invalid=sonnet]", "labels": ["billing", "bug"],
         "tier": "sonnet"}, ["work"], "validate", ("work", "sonnet"), JobStatus.WORKING, None),
    "validate, extract schema": (
        {"kind": "extract", "text": "replayed INV-1 [fake:invalid=sonnet]", "schema": _SCHEMA, "tier": "sonnet"},
        ["work"], "validate", ("work", "sonnet"), JobStatus.WORKING, None),
    "validate, format check": (
        {"kind": "draft", "instructions": "replayed [fake:invalid=sonnet]", "tier": "sonnet"}, ["work"],
        "validate", ("work", "sonnet"), JobStatus.WORKING, "format_check"),
}
_STAGE = {"triage": stages.triage, "work": stages.work, "validate": stages.validate}
_FROM = {"triage": JobStatus.TRIAGING, "work": JobStatus.WORKING, "validate": JobStatus.VALIDATING}


@pytest.mark.parametrize("case", list(REPLAYS))
def test_a_replayed_result_whose_commit_went_through_hands_off_again(pipeline: Pipeline,  # noqa: F811
                                                                     tmp_path: Path, case: str) -> None:
    """Pipeline.run retries a stage's result when the connection drops, even if the result reached
    Postgres and only the acknowledgement was lost. The replay must recognise its own result, with
    or without a model call, and must not record the call again as unapplied, count its cost twice,
    or drop the hand-off (the job would wait for the long stage deadline)."""
    spec, before, stage, (next_stage, queue), to, call_stage = REPLAYS[case]
    [jid] = enqueue(pipeline, tmp_path, spec)
    dispatched(pipeline)
    for name in before:
        assert _STAGE[name](pipeline, jid) is not None
    version = job(pipeline, jid).version
    results: list[str] = []

    def lose_the_acknowledgement(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        # The result is one statement in autocommit (states.Also): the transition, its event and the
        # call row together. Once Postgres has run (and so committed) it, fail the way a connection
        # dropped before the answer came does.
        if "INSERT INTO job_events" in statement:
            results.append(statement)
            if len(results) == 1:
                raise OperationalError(statement, parameters,
                                       ConnectionError("server closed the connection unexpectedly"))

    event.listen(pipeline.engine, "after_cursor_execute", lose_the_acknowledgement)
    try:
        assert _STAGE[stage](pipeline, jid) == Handoff(next_stage, jid, queue)
    finally:
        event.remove(pipeline.engine, "after_cursor_execute", lose_the_acknowledgement)
    assert len(results) == 1  # the replay found the result applied and did not send it again
    done = job(pipeline, jid)
    assert (done.status, done.version) == (to, version + 1)
    with pipeline.sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == jid)).all()
        moves = s.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == jid, JobEvent.from_status == _FROM[stage], JobEvent.to_status == to))
        verdicts = s.scalar(select(func.count()).select_from(ValidationVerdict).where(ValidationVerdict.job_id == jid))
        decisions = s.scalars(select(RoutingDecision.reason_kind).where(RoutingDecision.job_id == jid,
                                                                         RoutingDecision.reason_kind != "pinned")).all()
    mine = [(c.outcome, c.applied) for c in calls if c.stage == call_stage]
    assert mine == ([("ok", True)] if call_stage else [])
    assert done.cost_usd == sum(c.cost_usd for c in calls)
    assert moves == 1
    assert verdicts == (1 if stage == "validate" else 0)
    # Triage, and a failed validation sending the job back to work, each decide its route once.
    assert decisions == {"triage": ["triage"], "work": [], "validate": ["retry"]}[stage]


def test_a_replayed_claim_takes_its_own_claim_again_without_counting_a_delivery(pipeline: Pipeline,  # noqa: F811
                                                                               tmp_path: Path) -> None:
    """The claim's statements commit one by one. If the connection drops after the call row is
    written, Pipeline.run replays the claim: it must find its own claim (not refuse it as a live
    rival's, which would strand the job until the claim deadline), count the delivery once, and
    close the call row the first run left."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "claim replayed", "tier": "sonnet"})
    dispatched(pipeline)
    lost: list[str] = []

    def drop_after_call_row(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO model_calls") and not lost:
            lost.append(statement)
            raise OperationalError(statement, parameters, ConnectionError("server closed the connection unexpectedly"))

    event.listen(pipeline.engine, "after_cursor_execute", drop_after_call_row)
    try:
        assert stages.work(pipeline, jid) == Handoff("validate", jid, "validate")
    finally:
        event.remove(pipeline.engine, "after_cursor_execute", drop_after_call_row)
    assert lost
    with pipeline.sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == jid).order_by(ModelCall.id)).all()
        events = s.scalars(select(JobEvent.to_status).where(JobEvent.job_id == jid).order_by(JobEvent.id)).all()
    assert [(c.outcome, c.applied, c.delivery) for c in calls] == [("abandoned", False, 1), ("ok", True, 1)]
    assert job(pipeline, jid).status is JobStatus.VALIDATING
    assert events[-1] is JobStatus.VALIDATING
