"""What "every job ends exactly once" means, checked in Postgres after a fault-injection run.

Each fault case runs a batch, then calls ``check_exactly_once``. It asserts, for every job:

- **terminal**: the job is succeeded, failed or cancelled, with its output or its reason;
- **one final result**: its transitions (``job_events``) form one unbroken path from ``queued``,
  every step allowed by the state machine, with exactly one terminal step and that one last, and
  as many steps as the job's version. Two deliveries that both moved the job out of one state
  would show up as a step whose ``from_status`` is not where the previous step left the job, or as
  an extra step. A succeeded job has exactly one passing verdict; a failed one has none;
- **no stage moved twice**: each transition a stage makes leaves exactly one trace of its own: one
  applied call per triage and per work transition, one routing decision per entry into
  ``working``, one verdict per validation outcome (a format check made again because its answer
  was no verdict is a step of its own, with no verdict). A stage applied twice would leave two;
- **every model call recorded**: each request the fake Claude served is a ``model_calls`` row (by
  its request id), or else a row without one: a timeout or dropped connection (the client never
  saw an id), or a call ``abandoned`` when its worker died. No row stays ``started``. Counting both
  sides also proves retries never multiplied between the SDK and switchyard, and each row's attempt
  number proves they were bounded. Calls repeated because a stage was begun again are counted,
  and what ``switchyard stats`` reports of them (``report.summarize``) agrees with the rows;
- **money**: each job's cost is the sum of its calls' costs (a repeated apply would count twice).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import pairwise
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import load_config
from pipeline.fake_claude import FakeClaude
from pipeline.flow.states import ALLOWED
from pipeline.models import (
    TERMINAL,
    Job,
    JobEvent,
    JobStatus,
    ModelCall,
    RoutingDecision,
    Stage,
    ValidationVerdict,
)
from pipeline.queries.report import summarize

Q, T, W, V, S, F = (JobStatus.QUEUED, JobStatus.TRIAGING, JobStatus.WORKING, JobStatus.VALIDATING,
                    JobStatus.SUCCEEDED, JobStatus.FAILED)
# Transport failures: the client never received a response, so it has no request id to record.
NO_ANSWER_ERRORS = ("timeout", "connection_error")


@dataclass
class Facts:
    """What a checked batch looked like, for the test to assert more and to report."""

    jobs: int
    by_status: Counter[str]
    errors: dict[str, str]
    calls: int
    repeated_calls: int
    abandoned_calls: int
    no_answer_calls: int
    max_deliveries: int
    fake_requests: int
    faults: Counter[str] = field(default_factory=Counter)


def wait_until_fake_idle(fake: FakeClaude, timeout: float = 30.0) -> None:
    """The fake logs a request when it has finished with it; a stalled one may still be sleeping
    after its client gave up. Wait for those before comparing logs."""
    deadline = time.monotonic() + timeout
    while fake.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake.stats()["in_flight"] == 0, "the fake Claude still has requests in flight"


def _check_path(job: Job, events: list[JobEvent]) -> None:
    where = f"job {job.id} ({job.key})"
    path = [(e.from_status, e.to_status, e.detail) for e in events]
    assert events, f"{where} has no transitions"
    assert events[0].from_status is Q, f"{where} does not start at queued: {path}"
    for before, after in pairwise(events):
        assert after.from_status is before.to_status, f"{where} moved twice out of one state: {path}"
    for e in events:
        assert e.from_status is not None, f"{where}: a step from nowhere {path}"
        assert e.to_status in ALLOWED[e.from_status], f"{where}: illegal step {path}"
    terminal = [e for e in events if e.to_status in TERMINAL]
    assert len(terminal) == 1, f"{where} has {len(terminal)} final results: {path}"
    assert terminal[0] is events[-1], f"{where} moved on after its final result: {path}"
    assert events[-1].to_status is job.status, f"{where}: last event is not its status: {path}"
    assert len(events) == job.version, f"{where}: {len(events)} transitions but version {job.version}: {path}"


def check_exactly_once(sessions: sessionmaker[Session], batch_id: int, *, fake: FakeClaude,
                       max_attempts: int) -> Facts:
    wait_until_fake_idle(fake)
    served = [r for r in fake.requests() if r["request_id"]]
    with sessions() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.id)).all()
        ids = [j.id for j in jobs]
        events: dict[int, list[JobEvent]] = defaultdict(list)
        for e in s.scalars(select(JobEvent).where(JobEvent.job_id.in_(ids)).order_by(JobEvent.id)):
            events[e.job_id].append(e)
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id.in_(ids)).order_by(ModelCall.id)).all()
        decisions = Counter(s.scalars(select(RoutingDecision.job_id).where(RoutingDecision.job_id.in_(ids))))
        verdicts: dict[int, list[ValidationVerdict]] = defaultdict(list)
        for v in s.scalars(select(ValidationVerdict).where(ValidationVerdict.job_id.in_(ids))):
            verdicts[v.job_id].append(v)
        stats = summarize(s, load_config(), batch_id=batch_id).tiers

    calls_by_job: dict[int, list[ModelCall]] = defaultdict(list)
    for c in calls:
        calls_by_job[c.job_id].append(c)

    # -- every job terminal, with one final result -------------------------------------------------
    not_done = {j.key: j.status.value for j in jobs if j.status not in TERMINAL}
    assert not not_done, f"{len(not_done)} job(s) not terminal: {dict(list(not_done.items())[:10])}"
    for job in jobs:
        _check_path(job, events[job.id])
        assert job.finished_at is not None
        assert job.claimed_at is None
        assert job.claimed_by is None
        passed = [v for v in verdicts[job.id] if v.ok]
        if job.status is S:
            assert len(passed) == 1, f"job {job.key}: {len(passed)} passing verdicts"
            assert job.output is not None, f"job {job.key} succeeded without an output"
        else:
            assert not passed, f"job {job.key} ended {job.status.value} with a passing verdict"
            assert job.error, f"job {job.key} ended {job.status.value} without a reason"

    # -- no stage moved a job twice ------------------------------------------------------------------
    for job in jobs:
        steps = Counter((e.from_status, e.to_status) for e in events[job.id])
        applied = Counter(c.stage for c in calls_by_job[job.id] if c.applied)
        assert applied[Stage.TRIAGE] == steps[(T, W)], f"job {job.key}: triage applied {applied[Stage.TRIAGE]}x"
        # A verdict step: "... ok", or "validation failed..."; from working it is the work stage's
        # own verdict, applied with its answer ("sonnet attempt 1 answered; label ok").
        verdict_steps = [e for e in events[job.id] if e.from_status in (V, W) and e.detail
                         and (e.detail.endswith(" ok") or "validation failed" in e.detail)]
        judged_in_work = sum(1 for e in verdict_steps if e.from_status is W)
        assert applied[Stage.WORK] == steps[(W, V)] + judged_in_work, \
            f"job {job.key}: work applied {applied[Stage.WORK]}x"
        into_working = sum(n for (_, to), n in steps.items() if to is W)
        assert decisions[job.id] == into_working, f"job {job.key}: {decisions[job.id]} routing decisions"
        judged = len(verdict_steps)
        assert len(verdicts[job.id]) == judged, f"job {job.key}: {len(verdicts[job.id])} verdicts, {judged} judged"
        # A format check whose answer was no verdict is made again (validating -> validating), once per answer.
        assert steps[(V, V)] <= steps[(W, V)], f"job {job.key}: {steps[(V, V)]} checks made again"
        assert applied[Stage.FORMAT_CHECK] <= judged - judged_in_work + steps[(V, V)]

    # -- every model call recorded -------------------------------------------------------------------
    still_started = [(c.job_id, c.stage.value, c.tier, c.delivery) for c in calls if c.outcome == "started"]
    assert not still_started, f"{len(still_started)} call row(s) still 'started' (job, stage, tier, delivery): " \
        f"{still_started[:5]}"
    assert max((c.attempt for c in calls), default=0) <= max_attempts, "a call retried past its bound"
    served_ids = Counter(r["request_id"] for r in served)
    assert all(n == 1 for n in Counter(c.request_id for c in calls if c.request_id).values()), \
        "a request id recorded twice"
    # The fake's request log holds its synchronous /v1/messages requests; a call answered in a message
    # batch (economy mode) is matched against the fake's batch results instead (tests/faults/test_economy.py).
    sync = [c for c in calls if c.message_batch_id is None]
    recorded_ids = Counter(c.request_id for c in sync if c.request_id)
    unknown = set(recorded_ids) - set(served_ids)
    assert not unknown, f"{len(unknown)} recorded call(s) the fake never served"
    unmatched = [r for r in served if r["request_id"] not in recorded_ids]
    # The fake answers 0 for a connection it dropped; a stall outlives the client's timeout.
    unmatched_no_answer = [r for r in unmatched if r["status"] == 0 or r["fault"] == "stall"]
    no_answer_rows = [c for c in sync if c.request_id is None and c.outcome == "error"
                      and c.error_type in NO_ANSWER_ERRORS]
    abandoned = [c for c in calls if c.outcome == "abandoned"]
    other_rows = [c for c in sync if c.request_id is None and c not in no_answer_rows and c not in abandoned]
    assert not other_rows, f"{len(other_rows)} call row(s) without a request id: {other_rows[0].error_type}"
    # Every request the fake stalled or dropped is a timeout or a drop in the rows, unless its worker
    # died before recording it. The converse is looser: each timeout the client recorded is a request
    # the fake served with no row of its own, but the fake may have answered it, too late (a loaded
    # machine can hold an ordinary answer past the client's timeout), so it need not be a stall.
    assert len(unmatched_no_answer) <= len(no_answer_rows) + len(abandoned), (
        f"{len(unmatched_no_answer)} unanswered requests at the fake, {len(no_answer_rows)} recorded")
    assert len(no_answer_rows) <= len(unmatched), (
        f"{len(no_answer_rows)} timeouts/drops recorded, but only {len(unmatched)} request(s) at the fake "
        f"without a row ({len(unmatched_no_answer)} stalled or dropped)")
    # A request served to a worker that then died is recorded as that call's abandoned row (a killed
    # worker may also die before its request leaves, so there can be fewer requests than rows).
    assert len(unmatched) <= len(no_answer_rows) + len(abandoned), (
        f"{len(unmatched)} request(s) at the fake are not recorded "
        f"({len(no_answer_rows)} timeouts/drops, {len(abandoned)} abandoned)")
    repeated = [c for c in calls if c.delivery > 1]
    # What `switchyard stats` says the faults cost is what the rows say.
    assert sum(t.calls for t in stats) == len(calls)
    assert sum(t.repeated_calls for t in stats) == len(repeated), "stats miscount the repeated calls"
    assert sum(t.abandoned_calls for t in stats) == len(abandoned), "stats miscount the abandoned calls"

    # -- money ------------------------------------------------------------------------------------------
    for job in jobs:
        spent = sum((c.cost_usd for c in calls_by_job[job.id]), Decimal(0))
        assert job.cost_usd == spent, f"job {job.key}: cost {job.cost_usd} but its calls cost {spent}"

    return Facts(
        jobs=len(jobs),
        by_status=Counter(j.status.value for j in jobs),
        errors={j.key: j.error or "" for j in jobs if j.status is F},
        calls=len(calls),
        repeated_calls=len(repeated),
        abandoned_calls=len(abandoned),
        no_answer_calls=len(no_answer_rows),
        max_deliveries=max((c.delivery for c in calls), default=0),
        fake_requests=len(served),
        faults=Counter(r["fault"] for r in served if r["fault"]),
    )


def check_retry_after(served: Sequence[dict[str, Any]], calls: Sequence[ModelCall], *, seconds: float) -> int:
    """No request came back sooner than the retry-after of the 429 before it.

    Each request the fake served is put with its job's stage and delivery through the request id
    its row recorded, and the requests of one delivery of a stage are ordered by the fake's own
    clock: after a 429, the next request (the next attempt, or the first of the next round once the
    stage went back to its queue, which keeps its delivery number) must start at least ``seconds``
    after the 429 was answered. A second delivery of the stage (a claim taken for dead) is a call of
    its own, which may have been sent before the other's 429 was known. Returns how many requests
    followed a 429."""
    stage_of = {c.request_id: (c.job_id, c.stage.value, c.delivery) for c in calls if c.request_id}
    by_stage: dict[tuple[int, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in served:
        if r["request_id"] in stage_of:
            by_stage[stage_of[r["request_id"]]].append(r)
    followed = 0
    for key, requests in by_stage.items():
        requests.sort(key=lambda r: r["started_at"])
        for before, after in pairwise(requests):
            if before["status"] == 429:
                followed += 1
                gap = after["started_at"] - before["ended_at"]
                assert gap >= seconds, f"job {key[0]}'s {key[1]} call came back {gap:.3f} s after a 429 " \
                    f"that asked for {seconds} s"
    return followed


def unexpected_failures(facts: Facts) -> dict[str, str]:
    """Failures other than the jobs built to fail (doomed-*) — what a fault must not cause."""
    return {k: v for k, v in facts.errors.items() if not k.startswith("doomed-")}


def summary(facts: Facts, **extra: Any) -> dict[str, Any]:
    return {"jobs": facts.jobs, **dict(facts.by_status), "calls": facts.calls, "repeated_calls": facts.repeated_calls,
            "abandoned_calls": facts.abandoned_calls, **extra}
