"""Budgets (pipeline.flow.budgets): the reservation arithmetic, and the reservations, pauses, releases
and resumes on Postgres with the stages run as plain functions against the fake Claude."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.client import ClaudeClient
from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import ModelConfig
from pipeline.errors import InvalidInput
from pipeline.fake_claude import FakeClaude
from pipeline.flow import budgets, stages
from pipeline.flow.dispatch import dispatch, settle_budgets
from pipeline.flow.stages import Handoff, Pipeline
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Batch, BudgetReservation, Job, JobStatus, ModelCall
from pipeline.queries.history import cancel_batch

# -- the arithmetic --------------------------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("tier", ["haiku", "sonnet", "opus"])
def test_the_worst_case_bounds_every_cost_a_call_can_have(models: ModelConfig, tier: str, cached: bool) -> None:
    system, user = "You classify tickets. " * 40, "Ticket: «charged twice» — 请退款"
    bound = budgets.input_bound(system, user)
    worst = budgets.worst_case(models, tier, input_tokens=bound, max_tokens=2048, cached=cached)
    cfg = models.tier(tier)
    # Every way the same input can be billed (uncached, written to the cache for 5 minutes or an
    # hour, read from it), with all of max_tokens out.
    usages = [Usage(input_tokens=bound, output_tokens=2048)]
    if cached:
        usages += [Usage(cache_creation_input_tokens=bound, output_tokens=2048),
                   Usage(cache_creation_input_tokens=bound, cache_creation_1h_input_tokens=bound, output_tokens=2048),
                   Usage(cache_read_input_tokens=bound, output_tokens=2048)]
    for usage in usages:
        assert call_cost(cfg, usage, config=models) <= worst, usage
    # ...and not wildly more: the budget's room is not wasted on padding.
    assert worst <= call_cost(cfg, usages[-1 if not cached else 2], config=models) + Decimal("0.00000001")


def test_the_input_bound_is_never_under_the_characters_estimate() -> None:
    for text in ["", "a" * 1000, "é" * 1000, "日本語" * 300, "🙂" * 100]:
        assert budgets.input_bound(text, text) >= (2 * len(text)) // 4 + budgets.FRAMING_TOKENS
        assert budgets.input_bound(text, "") >= len(text)  # one token per character at the very most


def test_fits_at_the_limit_and_not_a_step_over() -> None:
    step = budgets.PLACES
    assert budgets.fits(Decimal("1"), spent=Decimal("0.4"), reserved=Decimal("0.3"), amount=Decimal("0.3"))
    assert not budgets.fits(Decimal("1"), spent=Decimal("0.4"), reserved=Decimal("0.3"), amount=Decimal("0.3") + step)
    assert budgets.fits(None, spent=Decimal("5"), reserved=Decimal("5"), amount=Decimal("5"))
    assert budgets.room(Decimal("1"), spent=Decimal("0.9"), reserved=Decimal("0.3")) == 0
    assert budgets.room(Decimal("1"), spent=Decimal("0.5"), reserved=Decimal("0.2")) == Decimal("0.3")
    assert budgets.room(None, spent=Decimal(1), reserved=Decimal(1)) is None


@pytest.mark.parametrize(("value", "said"), [
    ("-1", "--budget-usd must be 0 or more"), ("abc", "is not a number of dollars"),
    ("nan", "is not a number of dollars"), ("inf", "is not a number of dollars"),
    ("0.000000001", "more than 8 decimal places"), ("1e9", "must be under"),
])
def test_a_bad_budget_is_one_sentence(value: str, said: str) -> None:
    with pytest.raises(InvalidInput, match=said) as caught:
        budgets.check_budget(value)
    assert "\n" not in str(caught.value)


def test_a_good_budget_is_kept_exactly() -> None:
    assert budgets.check_budget("12.5") == Decimal("12.5")
    assert budgets.check_budget(" 0 ") == 0
    assert budgets.check_budget("-0") == 0


# -- on Postgres -------------------------------------------------------------------------------------


@pytest.fixture
def pipeline(sessions: sessionmaker[Session], fake_claude: FakeClaude, models: ModelConfig) -> Iterator[Pipeline]:
    client = ClaudeClient(api_key="test", base_url=fake_claude.base_url, attempts=2, sleep=lambda s: None)
    yield Pipeline(sessions=sessions, client=client, models=models, max_deliveries=3)
    client.close()


_n = iter(range(10**6))
JOB = {"kind": "classify", "text": "charged twice [fake:difficulty=easy]", "labels": ["billing", "bug"]}


def enqueue(p: Pipeline, tmp_path: Path, n: int, *, budget: Decimal | None) -> int:
    path = tmp_path / f"budget-{next(_n)}.jsonl"
    path.write_text("".join(json.dumps({**JOB, "key": f"k{i}"}) + "\n" for i in range(n)))
    return enqueue_file(p.sessions, path, batch=path.stem + tmp_path.name, config=p.models,
                        budget_usd=budget).batch_id or 0


def run_all(p: Pipeline, handoffs: list[Handoff]) -> None:
    step = {"triage": stages.triage, "work": stages.work, "validate": stages.validate}
    while handoffs:
        h = handoffs.pop()
        nxt = step[h.stage](p, h.job_id)
        if nxt:
            handoffs.append(nxt)


def batch_jobs(p: Pipeline, batch_id: int) -> list[Job]:
    with p.sessions() as s:
        return list(s.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.id)))


def state(p: Pipeline, batch_id: int) -> budgets.BudgetState:
    with p.sessions() as s:
        return budgets.states(s, [batch_id])[batch_id]


def job_costs(p: Pipeline, batch_id: int) -> Decimal:
    with p.sessions() as s:
        return Decimal(s.scalar(select(func.coalesce(func.sum(ModelCall.cost_usd), 0))
                                .join(Job, Job.id == ModelCall.job_id).where(Job.batch_id == batch_id)) or 0)


def test_a_batch_stops_at_its_budget_pauses_and_resumes_when_raised(pipeline: Pipeline, tmp_path: Path) -> None:
    p = pipeline
    # Room for every triage call (haiku: well under $0.001 each at worst) and for no work call (sonnet:
    # its 2,048 tokens out alone may cost $0.02).
    batch_id = enqueue(p, tmp_path, 6, budget=Decimal("0.01"))
    run_all(p, [h for h in p.run(lambda s: dispatch(s, max_in_flight=10_000)) if h.job_id in
                {j.id for j in batch_jobs(p, batch_id)}])
    st = state(p, batch_id)
    jobs = batch_jobs(p, batch_id)
    paused = [j for j in jobs if j.status is JobStatus.PAUSED]
    assert paused and st.exhausted and st.paused == len(paused)
    assert all(j.paused_reason == "budget" and j.paused_need_usd and j.paused_from for j in paused)
    assert st.reserved_usd == 0  # nothing in flight
    assert st.spent_usd == job_costs(p, batch_id) <= Decimal("0.01")
    # A paused job's call was never made: no call row is left "started" for it.
    with p.sessions() as s:
        assert not s.scalar(select(func.count()).select_from(ModelCall).where(
            ModelCall.job_id.in_([j.id for j in paused]), ModelCall.outcome == "started"))
    # Nothing fits, so the dispatcher resumes nothing...
    assert p.run(settle_budgets) == []
    # ...until the budget is raised.
    with p.sessions() as s:
        budgets.set_budget(s, batch_id, Decimal("5"))
        s.commit()
    resumed = p.run(settle_budgets)
    assert sorted(h.job_id for h in resumed) == [j.id for j in paused]
    run_all(p, resumed)
    assert {j.status for j in batch_jobs(p, batch_id)} == {JobStatus.SUCCEEDED}
    st = state(p, batch_id)
    assert st.spent_usd == job_costs(p, batch_id) and st.paused == 0 and not st.exhausted


def test_concurrent_reservations_never_overrun(pipeline: Pipeline, tmp_path: Path) -> None:
    """Forty threads reserve at once against a budget that holds seven of their calls."""
    p = pipeline
    batch_id = enqueue(p, tmp_path, 40, budget=Decimal("0.7"))
    jobs = batch_jobs(p, batch_id)
    with p.sessions() as s:
        s.execute(update(Job).where(Job.batch_id == batch_id).values(status=JobStatus.TRIAGING))
        calls = [s.scalar(ModelCall.__table__.insert().values(job_id=j.id, stage="triage", tier="haiku", model="m",
                                                              attempt=1, outcome="started")
                          .returning(ModelCall.id)) for j in jobs]
        s.commit()
    go = threading.Barrier(len(jobs))
    outcomes: list[object] = [None] * len(jobs)

    def reserve(i: int) -> None:
        go.wait()
        outcomes[i] = p.run(lambda s: budgets.reserve(s, job_id=jobs[i].id, version=jobs[i].version,
                                                      call_id=calls[i], amount=Decimal("0.1")))

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcomes if isinstance(o, budgets.Hold)]
    short = [o for o in outcomes if isinstance(o, budgets.Shortfall)]
    assert len(held) == 7 and len(short) == 33
    st = state(p, batch_id)
    assert st.reserved_usd == Decimal("0.7") and st.paused == 33


def test_a_dead_calls_reservation_is_released_once(pipeline: Pipeline, tmp_path: Path) -> None:
    p = pipeline
    batch_id = enqueue(p, tmp_path, 2, budget=Decimal("1"))
    a, b = batch_jobs(p, batch_id)
    with p.sessions() as s:
        s.execute(update(Job).where(Job.batch_id == batch_id).values(status=JobStatus.TRIAGING))
        calls = [s.scalar(ModelCall.__table__.insert().values(job_id=j.id, stage="triage", tier="haiku", model="m",
                                                              attempt=1, outcome="started")
                          .returning(ModelCall.id)) for j in (a, b)]
        s.commit()
    holds = [p.run(lambda s, j=j, c=c: budgets.reserve(s, job_id=j.id, version=j.version, call_id=c,
                                                       amount=Decimal("0.4")))
             for j, c in zip((a, b), calls, strict=True)]
    assert all(isinstance(h, budgets.Hold) for h in holds)
    assert state(p, batch_id).reserved_usd == Decimal("0.8")
    # Call a's worker dies: the sweeper marks its call abandoned, and the tick releases it, once.
    with p.sessions() as s:
        s.execute(update(ModelCall).where(ModelCall.id == calls[0]).values(outcome="abandoned"))
        s.commit()
    assert p.run(budgets.release_abandoned) == 1
    assert p.run(budgets.release_abandoned) == 0
    assert state(p, batch_id).reserved_usd == Decimal("0.4")
    # Call a's result turns up after all (the worker was slow, not dead): its cost is counted, and
    # its reservation, already released, is not released a second time.
    hold = holds[0]
    assert isinstance(hold, budgets.Hold)
    writes = budgets.settle_writes(hold, Decimal("0.05"))
    p.run(lambda s: [w.execute(s, moved=False) for w in writes])
    st = state(p, batch_id)
    assert st.reserved_usd == Decimal("0.4") and st.spent_usd == Decimal("0.05")
    with p.sessions() as s:
        assert s.scalar(select(func.count()).select_from(BudgetReservation).where(
            BudgetReservation.batch_id == batch_id, BudgetReservation.released_at.is_(None))) == 1


def test_resume_and_cancel_of_paused_jobs(pipeline: Pipeline, tmp_path: Path) -> None:
    p = pipeline
    batch_id = enqueue(p, tmp_path, 3, budget=Decimal("0"))
    with p.sessions() as s:
        name = s.scalar(select(Batch.name).where(Batch.id == batch_id))
    run_all(p, [h for h in p.run(lambda s: dispatch(s, max_in_flight=10_000))
                if h.job_id in {j.id for j in batch_jobs(p, batch_id)}])
    assert {j.status for j in batch_jobs(p, batch_id)} == {JobStatus.PAUSED}
    assert job_costs(p, batch_id) == 0  # a budget of 0: no call at all
    # By hand: every paused job is moved back at the dispatcher's next tick, and pauses again.
    with p.sessions() as s:
        assert budgets.resume_batch(s, batch_id, name) == 3
        s.commit()
    resumed = p.run(settle_budgets)
    assert len(resumed) == 3 and {h.stage for h in resumed} == {"triage"}
    run_all(p, resumed)
    assert {j.status for j in batch_jobs(p, batch_id)} == {JobStatus.PAUSED}
    # Cancel takes paused jobs.
    with p.sessions() as s:
        assert cancel_batch(db_session=s, batch=batch_id).cancelled == 3
    assert {j.status for j in batch_jobs(p, batch_id)} == {JobStatus.CANCELLED}
    # Resume of a batch with no paused job: one sentence, and nothing changes.
    with p.sessions() as s, pytest.raises(InvalidInput, match="has no paused jobs"):
        budgets.resume_batch(s, batch_id, name)
    assert {j.status for j in batch_jobs(p, batch_id)} == {JobStatus.CANCELLED}


def test_a_batch_out_of_budget_does_not_hold_back_one_with_room(pipeline: Pipeline, tmp_path: Path) -> None:
    p = pipeline
    starved = enqueue(p, tmp_path, 5, budget=Decimal("0.001"))  # older: its paused jobs come first by id
    raised = enqueue(p, tmp_path, 2, budget=Decimal("1"))
    with p.sessions() as s:
        s.execute(update(Job).where(Job.batch_id.in_([starved, raised]))
                  .values(status=JobStatus.PAUSED, paused_reason="budget", paused_from="triaging",
                          paused_need_usd=Decimal("0.01")))
        s.commit()
    # However few it may resume at once, what fits is found behind what does not.
    resumed = p.run(lambda s: budgets.resume_due(s, limit=2))
    assert sorted(r.id for r in resumed) == [j.id for j in batch_jobs(p, raised)]
    assert {r.status for r in resumed} == {JobStatus.TRIAGING}
    assert {j.status for j in batch_jobs(p, starved)} == {JobStatus.PAUSED}
