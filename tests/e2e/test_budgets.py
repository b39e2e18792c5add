"""A budget holds with real worker processes, many calls in flight, and a worker SIGKILLed mid-call:
the sum of the batch's actual costs stays under its budget, the jobs that do not fit pause, the
batch reports its budget exhausted, the dead worker's reservations are released once, and raising
the budget finishes the batch (pipeline.flow.budgets)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig, load_config
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.flow import budgets
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import ACTIVE, Batch, BudgetReservation, Job, JobStatus, ModelCall
from tests.cli import invoke
from tests.cluster import Cluster, wait_for_batch

JOBS = 60
# Shorter answers than the defaults' 2,048 tokens (the fake's generations are ~50), so that a call's
# worst case is twice its actual cost, not forty times, and a small budget has many calls in flight.
WORK_MAX_TOKENS = 64


def short_config(path: Path) -> Path:
    from importlib import resources

    text = resources.files("pipeline").joinpath("defaults.toml").read_text()
    path.write_text(text.replace("work_max_tokens = 2048", f"work_max_tokens = {WORK_MAX_TOKENS}"))
    return path


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return short_config(tmp_path_factory.mktemp("budgets") / "models.toml")


@pytest.fixture(scope="module")
def own(fresh_database: Callable[[str], str]) -> Iterator[tuple[str, sessionmaker[Session]]]:
    # A database of its own: paused jobs and a dispatcher that resumes them must not meet another
    # module's batches.
    url = fresh_database("budgets")
    engine = make_engine(url)
    yield url, session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def slow_fake() -> Iterator[FakeClaude]:
    # Latency, so that many calls are in flight when the budget runs out and when a worker dies.
    fake = FakeClaude(port=0, options=FakeOptions(latency_ms=300, latency_jitter_ms=200, seed=5)).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def cluster(own: tuple[str, sessionmaker[Session]], broker_url: str, slow_fake: FakeClaude, config_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(database_url=own[0], broker_url=broker_url, claude_url=slow_fake.base_url,
                workdir=tmp_path_factory.mktemp("budgets-cluster"),
                env_extra={"SWITCHYARD_CONFIG": str(config_path), "SWITCHYARD_CLAIM_DEADLINE_S": "5",
                           "SWITCHYARD_CALL_TIMEOUT_S": "5",
                           # The killed worker's prefetched messages, never begun, go with it: the
                           # sweeper republishes them after this, not after the usual 60 s.
                           "SWITCHYARD_STAGE_DEADLINE_S": "15"})
    try:
        # The jobs are pinned to opus: no triage, and no sonnet.
        procs = [c.worker(q, concurrency=24, wait=False) for q in ("opus", "validate")]
        procs.append(c.dispatcher(wait=False))
        c.wait_ready(procs, timeout=90)
        yield c
    finally:
        c.stop()


def batch_spend(sessions: sessionmaker[Session], batch_id: int) -> Decimal:
    with sessions() as s:
        return Decimal(s.scalar(select(func.coalesce(func.sum(ModelCall.cost_usd), 0))
                                .join(Job, Job.id == ModelCall.job_id).where(Job.batch_id == batch_id)) or 0)


def settled(sessions: sessionmaker[Session], batch_id: int) -> bool:
    """Nothing of the batch is running or waiting to run, and nothing is reserved."""
    with sessions() as s:
        busy = s.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == batch_id, Job.status.in_([JobStatus.QUEUED, *ACTIVE])))
        held = s.scalar(select(func.count()).select_from(BudgetReservation).where(
            BudgetReservation.batch_id == batch_id, BudgetReservation.released_at.is_(None)))
    return busy == 0 and held == 0


def wait(predicate: Callable[[], bool], *, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.1)


def test_concurrent_workers_cannot_overrun_a_budget_even_when_one_is_killed(
        cluster: Cluster, own: tuple[str, sessionmaker[Session]], config_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sessions = own[1]
    monkeypatch.setenv("DATABASE_URL", own[0])
    models: ModelConfig = load_config(config_path)
    jobs = [{"key": f"j{i}", "kind": "generate", "prompt": f"Five subject lines for sale {i}", "tier": "opus"}
            for i in range(JOBS)]
    path = tmp_path / "budgeted.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    # About a third of what the batch costs (each job: an opus answer and a haiku format check, ~$0.0012);
    # an opus call's worst case is ~$0.002, so about a dozen fit at once.
    budget = Decimal("0.024")
    report = enqueue_file(sessions, path, batch="budgeted", config=models, budget_usd=budget)
    batch_id = report.batch_id
    assert batch_id is not None and report.accepted == JOBS

    # Kill the opus worker while it has calls in flight that hold reservations.
    def opus_calls_held() -> bool:
        with sessions() as s:
            return (s.scalar(select(func.count()).select_from(BudgetReservation)
                             .join(ModelCall, ModelCall.id == BudgetReservation.call_id)
                             .where(BudgetReservation.batch_id == batch_id, BudgetReservation.released_at.is_(None),
                                    ModelCall.tier == "opus", ModelCall.outcome == "started")) or 0) >= 3

    wait(opus_calls_held, timeout=90, what="opus calls in flight", cluster=cluster)
    victim = next(p for p in cluster.procs if p.name == "worker-opus" and p.alive)
    victim.signal(signal.SIGKILL)
    victim.popen.wait(10)
    cluster.restart(victim, wait_ready=False)

    wait(lambda: settled(sessions, batch_id), timeout=240, what="the batch to run out of budget", cluster=cluster)
    spent = batch_spend(sessions, batch_id)
    with sessions() as s:
        st = budgets.states(s, [batch_id])[batch_id]
        batch = s.get_one(Batch, batch_id)
        abandoned = s.execute(select(BudgetReservation.released_at, BudgetReservation.cost_usd)
                              .join(ModelCall, ModelCall.id == BudgetReservation.call_id)
                              .where(BudgetReservation.batch_id == batch_id,
                                     ModelCall.outcome == "abandoned")).all()
    # The guarantee, and the counter the reservations check agrees with the calls' own costs.
    assert spent <= budget, (spent, budget)
    assert batch.budget_spent_usd == spent
    # Jobs paused rather than failed, and the batch says its budget is exhausted.
    assert st.paused > 0 and st.exhausted and st.reserved_usd == 0
    # The killed worker's calls held reservations: each was released (once: closed, never settled).
    assert abandoned and all(r.released_at is not None and r.cost_usd is None for r in abandoned)
    # Spending got close to the budget before jobs paused: the dispatcher resumed every paused job
    # that fitted, so what is left is less than what a paused job needs.
    with sessions() as s:
        needs = s.scalars(select(Job.paused_need_usd).where(Job.batch_id == batch_id,
                                                            Job.status == JobStatus.PAUSED)).all()
    assert all(budget - spent < need for need in needs), (spent, budget, needs)

    # `switchyard batches` shows it; raising the budget finishes the batch.
    code, out, _ = invoke(monkeypatch, capsys, "batches", "--json")
    [row] = [b for b in json.loads(out) if b["id"] == batch_id]
    assert code == 0 and row["budget"]["exhausted"] is True and row["budget"]["paused"] == st.paused
    code, out, err = invoke(monkeypatch, capsys, "batches", "budget", "budgeted", "--usd", "100")
    assert code == 0 and "budget set to $100" in out, err
    wait_for_batch(sessions, batch_id, timeout=240, cluster=cluster)
    with sessions() as s:
        statuses = dict(s.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id)
                                  .group_by(Job.status)).all())  # type: ignore[arg-type]
        batch = s.get_one(Batch, batch_id)
    assert statuses == {JobStatus.SUCCEEDED: JOBS}
    assert batch.budget_spent_usd == batch_spend(sessions, batch_id) > budget


@pytest.mark.parametrize(("args", "said"), [
    (["batches", "budget", "idle", "--usd", "-1"], "--usd must be 0 or more"),
    (["batches", "budget", "idle", "--usd", "lots"], "--usd 'lots' is not a number of dollars"),
    (["batches", "budget", "no-such-batch", "--usd", "1"], "no-such-batch"),
    (["batches", "resume", "idle"], "batch 'idle' has no paused jobs, so there is nothing to resume"),
])
def test_bad_budgets_and_resumes_are_one_sentence_and_change_nothing(
        own: tuple[str, sessionmaker[Session]], config_path: Path, args: list[str], said: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sessions = own[1]
    monkeypatch.setenv("DATABASE_URL", own[0])
    path = tmp_path / "idle.jsonl"
    path.write_text(json.dumps({"key": "only", "kind": "generate", "prompt": "a name", "tier": "opus"}) + "\n")
    enqueue_file(sessions, path, batch="idle", config=load_config(config_path), budget_usd=Decimal("5"))

    def snapshot() -> list[tuple[object, ...]]:
        with sessions() as s:
            return [tuple(r) for r in s.execute(select(Batch.id, Batch.budget_usd, Job.id, Job.status,
                                                       Job.paused_need_usd).join(Job, Job.batch_id == Batch.id)
                                                .where(Batch.name == "idle").order_by(Job.id))]

    before = snapshot()
    code, _, err = invoke(monkeypatch, capsys, *args)
    assert code == 2 and said in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert [r[:2] for r in snapshot()] == [r[:2] for r in before]  # the budget as it was
