"""A stage whose call meets only transient errors (429, 529, 5xx, timeouts) until its attempts run
out goes back to its queue after a growing wait kept in Postgres, and fails only past the patience.
Postgres and the fake Claude over HTTP, no broker: the dispatcher's refeed is called directly."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path

import redis
from sqlalchemy import select, update

from pipeline.claude.ratelimit import RedisRateLimiter
from pipeline.fake_claude import FakeClaude
from pipeline.flow import stages
from pipeline.flow.dispatch import refeed, sweep
from pipeline.flow.stages import Handoff, Pipeline
from pipeline.models import Job, JobStatus, ModelCall, utcnow
from pipeline.queries.ops import gather
from tests.unit.test_stages import dispatched, enqueue, job, pipeline  # noqa: F401  (the fixture)


def _refed(p: Pipeline, at: datetime) -> list[Handoff]:
    return p.run(lambda s: refeed(s, now=at))


def _waited(p: Pipeline, jid: int, seconds: float) -> None:
    """As if the job's stage had met nothing but transient errors for ``seconds``, and were due now."""
    now = utcnow()
    p.run(lambda s: s.execute(update(Job).where(Job.id == jid).values(
        transient_since=now - timedelta(seconds=seconds), not_before=now - timedelta(seconds=1))))


def _wait_of(p: Pipeline, jid: int) -> float:
    j = job(p, jid)
    assert j.not_before is not None
    return (j.not_before - utcnow()).total_seconds()


def test_a_stage_out_of_attempts_waits_in_postgres_then_runs_again(pipeline: Pipeline, fake_claude: FakeClaude,  # noqa: F811
                                                                   broker_url: str, tmp_path: Path) -> None:
    pipeline.transient_wait_min_s = 30
    # Three overloads, then answers: the first round's two attempts both meet one.
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate",
                                         "prompt": f"busy {uuid.uuid4()} [fake:error=529@haiku] [fake:times=3]"})
    dispatched(pipeline)

    assert stages.triage(pipeline, jid) is None  # no hand-off: nothing goes to the broker now
    waiting = job(pipeline, jid)
    assert waiting.status is JobStatus.TRIAGING and waiting.error is None
    assert waiting.claimed_at is None and waiting.deliveries == 0  # the claim is released, not a death
    assert waiting.transient_since is not None
    assert 29 < _wait_of(pipeline, jid) < 30 * 1.25 + 1

    # Nothing runs it before its time: not the dispatcher, not the sweeper after a broker loss (the
    # wait is in Postgres, not in a message), not a stray message for the stage.
    assert jid not in [h.job_id for h in _refed(pipeline, utcnow())]
    assert jid not in [h.job_id for h in pipeline.run(lambda s: sweep(s, deadline_s=0, claim_deadline_s=0,
                                                                      lost_before=utcnow()))]
    sent = len(fake_claude.requests())
    assert stages.triage(pipeline, jid) is None
    assert len(fake_claude.requests()) == sent
    # `switchyard status` (and the API's /v1/queue) count it as retrying later.
    with pipeline.sessions() as s:
        client = redis.Redis.from_url(broker_url)
        status = gather(client, s, pipeline.models, RedisRateLimiter(client, {}))
    triage_line = next(q for q in status.queues if q.queue == "triage")
    assert triage_line.retrying >= 1 and triage_line.in_flight >= triage_line.retrying

    # When it is due, the dispatcher publishes the stage again, and the stage runs to its end.
    assert waiting.not_before is not None
    assert Handoff("triage", jid, "triage") in _refed(pipeline, waiting.not_before + timedelta(seconds=1))
    assert job(pipeline, jid).not_before is None
    assert stages.triage(pipeline, jid) is not None
    moved = job(pipeline, jid)
    assert moved.status is JobStatus.WORKING and moved.transient_since is None
    with pipeline.sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == jid).order_by(ModelCall.id)).all()
    assert [(c.attempt, c.outcome, c.status_code) for c in calls] == [
        (1, "error", 529), (2, "error", 529), (1, "error", 529), (2, "ok", 200)]
    assert {c.delivery for c in calls} == {1}  # a round after a wait is no repeated delivery
    assert [c.applied for c in calls] == [False, False, False, True]


def test_the_wait_grows_and_the_patience_ends_it(pipeline: Pipeline, tmp_path: Path) -> None:  # noqa: F811
    pipeline.transient_wait_min_s, pipeline.transient_wait_max_s = 1, 120
    pipeline.transient_patience_s = 600
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "tier": "sonnet",
                                         "prompt": f"down {uuid.uuid4()} [fake:error=529@sonnet]"})
    dispatched(pipeline)

    assert stages.work(pipeline, jid) is None
    assert 0.5 < _wait_of(pipeline, jid) < 1.25 + 1  # the minimum first
    # Having waited 100 s, it waits as long again (with up to a quarter more, to spread the herd).
    _waited(pipeline, jid, 100)
    assert _refed(pipeline, utcnow())
    assert stages.work(pipeline, jid) is None
    assert 99 < _wait_of(pipeline, jid) < 126
    # Never longer than the maximum...
    _waited(pipeline, jid, 300)
    _refed(pipeline, utcnow())
    assert stages.work(pipeline, jid) is None
    assert 119 < _wait_of(pipeline, jid) < 151
    # ...and the last try comes when the patience ends.
    _waited(pipeline, jid, 590)
    _refed(pipeline, utcnow())
    assert stages.work(pipeline, jid) is None
    assert 9 < _wait_of(pipeline, jid) < 11
    assert job(pipeline, jid).status is JobStatus.WORKING

    # Past the patience, the job fails, and its reason names the patience and the last error.
    _waited(pipeline, jid, 601)
    _refed(pipeline, utcnow())
    assert stages.work(pipeline, jid) is None
    failed = job(pipeline, jid)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert "work call to sonnet failed: only transient errors for 10 min" in failed.error
    assert "the patience of 10 min (SWITCHYARD_TRANSIENT_PATIENCE_S)" in failed.error
    assert "529 overloaded_error" in failed.error
    assert failed.failure_reason == ("work call to sonnet: transient errors past the patience "
                                     "(last 529 overloaded_error)")
    assert failed.not_before is None and failed.transient_since is None


def test_with_no_patience_the_first_round_that_runs_out_fails_the_job(pipeline: Pipeline,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    pipeline.transient_patience_s = 0
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "tier": "sonnet",
                                         "prompt": f"down {uuid.uuid4()} [fake:error=500@sonnet]"})
    dispatched(pipeline)
    assert stages.work(pipeline, jid) is None
    failed = job(pipeline, jid)
    assert failed.status is JobStatus.FAILED
    assert "past the patience of 0 s (SWITCHYARD_TRANSIENT_PATIENCE_S)" in (failed.error or "")
    assert failed.failure_reason == "work call to sonnet: transient errors past the patience (last 500 api_error)"


def test_a_permanent_error_names_a_short_reason_for_the_summaries(pipeline: Pipeline,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "generate", "tier": "sonnet",
                                         "prompt": f"bad {uuid.uuid4()} [fake:error=400@sonnet]"})
    dispatched(pipeline)
    assert stages.work(pipeline, jid) is None
    failed = job(pipeline, jid)
    assert failed.status is JobStatus.FAILED
    assert failed.failure_reason == "work call to sonnet: 400 invalid_request_error"
