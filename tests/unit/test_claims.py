"""Stage claims, the workers' heartbeats and the sweeper's two deadlines, on Postgres (and Redis for
the heartbeats): what lets a killed worker's jobs come back fast without taking work from a live
one or republishing healthy queued work, and keeps a poison job from taking innocent jobs down
with it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import OperationalError

from pipeline.flow import stages
from pipeline.flow.dispatch import sweep, sweep_stalled
from pipeline.flow.stages import Handoff, Pipeline
from pipeline.flow.states import begin_stage
from pipeline.models import Job, JobEvent, JobStatus, ModelCall, RoutingDecision, Stage, ValidationVerdict, utcnow
from pipeline.queries.ops import Heartbeat, LapsedWorkers, workers_online
from tests.conftest import free_form
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
    # While it waits in the queue for the worker it killed to come back, past the claim deadline
    # (a slow restart), the other still waits: sent now, it would reach that worker beside it.
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id == first[0])
                                     .values(stage_started_at=utcnow() - timedelta(seconds=120))))
    assert not [j for j in _swept(pipeline) if j in (a, b)]
    # While that one runs, the other waits on probation.
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id == first[0]).values(claimed_at=utcnow())))
    assert not [j for j in _swept(pipeline) if j in (a, b)]
    # When it is done, the other goes.
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id == first[0]).values(claimed_at=None)))
    assert stages.work(pipeline, first[0]) is not None
    assert [j for j in _swept(pipeline) if j in (a, b)] == [b if first[0] == a else a]


# Each stage's result, replayed: the job (pinned to sonnet unless it is triaged), the stages run
# before the one under test, that stage, where its result hands the job, and the stage of its call.
# A failed validation hands the job back to work, so a dropped hand-off shows. The label and schema
# checks run on free text (FREE_FORM: under structured outputs the decoder keeps those answers to
# their schema); a refused answer is the deterministic verdict structured outputs still meet.
_SCHEMA = {"type": "object", "required": ["invoice"], "properties": {"invoice": {"type": "string"}}}
REPLAYS = {
    "triage": ({"kind": "generate", "prompt": "replayed [fake:difficulty=easy]"}, [], "triage",
               ("work", "sonnet"), JobStatus.WORKING, "triage"),
    "work": ({"kind": "generate", "prompt": "replayed", "tier": "sonnet"}, [], "work",
             ("validate", "validate"), JobStatus.VALIDATING, "work"),
    # A verdict that needs no model is applied by the work stage, in the statement recording its call.
    "work, classify label": (
        {"kind": "classify", "text": "replayed [fake:invalid=sonnet]", "labels": ["billing", "bug"],
         "tier": "sonnet"}, [], "work", ("work", "sonnet"), JobStatus.WORKING, "work"),
    "work, extract schema": (
        {"kind": "extract", "text": "replayed INV-1 [fake:invalid=sonnet]", "schema": _SCHEMA, "tier": "sonnet"},
        [], "work", ("work", "sonnet"), JobStatus.WORKING, "work"),
    "work, refused answer": (
        {"kind": "classify", "text": "replayed [fake:error=refusal@sonnet]", "labels": ["billing", "bug"],
         "tier": "sonnet"}, [], "work", ("work", "sonnet"), JobStatus.WORKING, "work"),
    "validate, format check": (
        {"kind": "draft", "instructions": "replayed [fake:invalid=sonnet]", "tier": "sonnet"}, ["work"],
        "validate", ("work", "sonnet"), JobStatus.WORKING, "format_check"),
}
FREE_FORM = {"work, classify label", "work, extract schema"}
JUDGED = {"work, classify label", "work, extract schema", "work, refused answer", "validate, format check"}
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
    if case in FREE_FORM:
        pipeline = dataclasses.replace(pipeline, models=free_form(pipeline.models))
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
    assert verdicts == (1 if case in JUDGED else 0)
    # Triage, and a failed validation sending the job back to work, each decide its route once.
    assert decisions == (["retry"] if case in JUDGED else {"triage": ["triage"], "work": []}[stage])


def test_a_replayed_claim_takes_its_own_claim_again_without_counting_a_delivery(pipeline: Pipeline,  # noqa: F811
                                                                               tmp_path: Path) -> None:
    """The claim's statements commit one by one (on Postgres the claim and its call row are one
    statement). If the connection drops after the call row is written, Pipeline.run replays the
    claim: it must find its own claim (not refuse it as a live
    rival's, which would strand the job until the claim deadline), count the delivery once, and
    close the call row the first run left."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "prompt": "claim replayed", "tier": "sonnet"})
    dispatched(pipeline)
    lost: list[str] = []

    def drop_after_call_row(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "INSERT INTO model_calls" in statement and not lost:
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


# -- claims that name their worker, and its heartbeat --------------------------------------------------


def _claim_as(p: Pipeline, worker_id: str | None, jid: int) -> None:
    """Begin a sonnet job's work stage as the worker process ``worker_id`` would."""
    claimed = stages._claim(dataclasses.replace(p, worker_id=worker_id), jid, JobStatus.WORKING,
                            lambda c: (Stage.WORK, "sonnet"))
    assert claimed is not None


def _swept_by_heartbeat(p: Pipeline, client: redis.Redis, **kw: object) -> list[int]:
    """One sweep as the dispatcher runs it, reading the heartbeats through ``client``."""
    return [h.job_id for h in sweep_stalled(p, lapsed=LapsedWorkers(client),
                                            **{"deadline_s": 3600, "claim_deadline_s": 60, **kw})]


def _sonnet_jobs(p: Pipeline, tmp_path: Path, n: int) -> list[int]:
    jids = enqueue(p, tmp_path, *({"kind": "generate", "prompt": f"held {i} {tmp_path.name}", "tier": "sonnet"}
                                  for i in range(n)))
    dispatched(p)
    return jids


# A worker process reduced to its heartbeat, beating every 0.2 s until it is killed.
BEATING = """
import sys, time, redis
from pipeline.queries.ops import Heartbeat
beat = Heartbeat(redis.Redis.from_url(sys.argv[1]), tier="sonnet", concurrency=1, pool="threads",
                 every_s=float(sys.argv[2])).start()
print(beat.worker_id, flush=True)
time.sleep(120)
"""


def test_a_killed_worker_s_claims_are_republished_once_its_heartbeat_lapses(
        pipeline: Pipeline, tmp_path: Path, broker_url: str) -> None:  # noqa: F811
    client = redis.Redis.from_url(broker_url)
    every_s = 0.2
    proc = subprocess.Popen([sys.executable, "-c", BEATING, broker_url, str(every_s)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        worker_id = proc.stdout.readline().strip()
        assert worker_id.startswith("sonnet@"), worker_id
        jid, = _sonnet_jobs(pipeline, tmp_path, 1)
        _claim_as(pipeline, worker_id, jid)
        assert job(pipeline, jid).claimed_by == worker_id
        # Alive: its claim is left alone, however many sweeps come.
        time.sleep(4 * every_s)
        assert jid not in _swept_by_heartbeat(pipeline, client)
    finally:
        proc.kill()  # SIGKILL: no clean-up, the heartbeat's record just stops being refreshed
        proc.wait()
    killed = time.monotonic()
    swept: list[int] = []
    while jid not in swept:
        assert time.monotonic() - killed < 10, "the dead worker's claim was not swept"
        swept = _swept_by_heartbeat(pipeline, client)
        time.sleep(0.02)
    after = time.monotonic() - killed
    # Republished after three missed beats, long before its claim deadline (60 s) would have passed,
    # and not before: its last beat came at most one beat before the kill.
    assert 2 * every_s <= after < 5, after
    held = job(pipeline, jid)
    assert (held.claimed_at, held.claimed_by) == (None, None)
    with pipeline.sessions() as s:
        assert s.scalars(select(ModelCall.outcome).where(ModelCall.job_id == jid)).all() == ["abandoned"]


def test_a_slow_busy_worker_keeps_its_claim_while_its_heartbeat_beats(
        pipeline: Pipeline, tmp_path: Path, broker_url: str) -> None:  # noqa: F811
    """A call that lasts many beats, in a process whose other threads hold the GIL: the heartbeat
    comes from its own thread, so the worker is never taken for dead."""
    client = redis.Redis.from_url(broker_url)
    every_s = 0.5
    beat = Heartbeat(client, tier="sonnet", concurrency=4, pool="threads", every_s=every_s).start()
    spinning = threading.Event()

    def spin() -> None:  # recording a wave of results: pure Python, holding the GIL
        while not spinning.is_set():
            sum(range(20_000))

    spinners = [threading.Thread(target=spin) for _ in range(4)]
    try:
        jid, = _sonnet_jobs(pipeline, tmp_path, 1)
        _claim_as(pipeline, beat.worker_id, jid)
        for t in spinners:
            t.start()
        busy_until = time.monotonic() + 6 * every_s  # the claim outlives the lapse margin (3 beats) twice over
        while time.monotonic() < busy_until:
            assert jid not in _swept_by_heartbeat(pipeline, client)
            time.sleep(0.05)
        assert beat.worker_id in {w.worker_id for w in workers_online(client)}
    finally:
        spinning.set()
        for t in spinners:
            t.join()
        beat.stop()
    assert job(pipeline, jid).claimed_by == beat.worker_id
    # A stopped worker leaves `status` at once.
    assert beat.worker_id not in {w.worker_id for w in workers_online(client)}
    # The same host and pid starting again is a different worker: its beats must not keep the
    # previous one's claims alive.
    again = Heartbeat(client, tier="sonnet", concurrency=4, pool="threads", every_s=every_s)
    assert again.worker_id != beat.worker_id


def test_without_a_readable_heartbeat_the_claim_deadline_decides(
        pipeline: Pipeline, tmp_path: Path, broker_url: str) -> None:  # noqa: F811
    client = redis.Redis.from_url(broker_url)
    # Nothing listens on port 1: Redis is down, as far as this sweeper can tell.
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5, socket_timeout=0.5)
    dead_beat = Heartbeat(client, tier="sonnet", concurrency=1, pool="threads", every_s=0.1).start()
    dead_beat.stop()
    time.sleep(0.5)  # five beats missed: its heartbeat has lapsed
    by_dead, unregistered, unnamed = _sonnet_jobs(pipeline, tmp_path, 3)
    _claim_as(pipeline, dead_beat.worker_id, by_dead)
    _claim_as(pipeline, "sonnet@elsewhere:1:0123456789ab", unregistered)  # never beat in this Redis
    _claim_as(pipeline, None, unnamed)  # a worker without a heartbeat (`celery -A workers worker`)
    mine = {by_dead, unregistered, unnamed}
    # Redis unreachable: no worker can be judged, and no fresh claim is taken.
    assert not mine & set(_swept_by_heartbeat(pipeline, down))
    # Readable: the lapsed worker's claim goes at once; the others are not judged on a heartbeat.
    assert mine & set(_swept_by_heartbeat(pipeline, client)) == {by_dead}
    # ...until their claim deadline passes, heartbeat or not.
    for jid in (unregistered, unnamed):
        _age_claim(pipeline, jid, 61)
    assert mine & set(_swept_by_heartbeat(pipeline, down)) == {unregistered, unnamed}


def test_a_lapsed_worker_s_suspects_go_on_probation_one_at_a_time_at_once(pipeline: Pipeline,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    """Suspects held by a worker whose heartbeat lapsed are not running: they must not keep each
    other (or themselves) on probation until their claim deadline."""
    a, b = _sonnet_jobs(pipeline, tmp_path, 2)
    dead = "sonnet@lost-host:7:00000000dead"
    pipeline.run(lambda s: s.execute(update(Job).where(Job.id.in_([a, b]))
                                     .values(deliveries=2, claimed_at=utcnow(), claimed_by=dead)))
    first = [h.job_id for h in pipeline.run(lambda s: sweep(s, deadline_s=3600, claim_deadline_s=60,
                                                            dead_workers={dead}))]
    assert len([j for j in first if j in (a, b)]) == 1
