"""Economy mode end to end, and its faults: real workers and dispatcher, the fake Claude's Message
Batches API over HTTP, one cluster for the whole module (each case its own batch).

The fake ends a message batch half a second after its creation, and the dispatcher submits a
model's pending requests once the oldest has waited 0.3 s and polls every 0.3 s, so a job's three
stages go through three message batches in a few seconds. After each case the fault-matrix
invariants hold (tests/faults/invariants.py): every job ends once, every call the fake served is
recorded once; and every message-batch answer the fake billed is one call row.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import load_config
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import (
    TERMINAL,
    Batch,
    BudgetReservation,
    EconomyRequest,
    Job,
    JobEvent,
    JobStatus,
    MessageBatch,
    ModelCall,
    ShadowEvaluation,
    ShadowStatus,
    Stage,
)
from tests.cluster import SWITCHYARD, Cluster, Proc, wait_for_batch
from tests.faults.conftest import FAST_ENV, wait_for
from tests.faults.invariants import check_exactly_once

pytestmark = pytest.mark.faults


def run_cli(args: list[str], *, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`switchyard ARGS` as an operator runs it, beside the cluster; fails the test on an error."""
    out = subprocess.run([SWITCHYARD, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"switchyard {' '.join(args)}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out

LABELS = ["billing", "shipping", "other"]
ECONOMY_TOML = """
[economy]
max_requests = 1000
max_age_s = 0.3
poll_interval_s = 0.3
create_timeout_s = 3
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeClaude]:
    with FakeClaude(port=0, options=FakeOptions(batch_delay_s=0.5)) as f:
        yield f


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("economy")


@pytest.fixture(scope="module")
def cluster(database_url: str, broker_url: str, fake: FakeClaude, workdir: Path) -> Iterator[Cluster]:
    defaults = (Path(__file__).parents[2] / "pipeline" / "defaults.toml").read_text()
    config = workdir / "economy.toml"
    # The bundled configuration with a short [economy] table (the rest as shipped).
    config.write_text(re.sub(r"\n\[economy\][^\[]*", "\n", defaults) + ECONOMY_TOML)
    c = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake.base_url, workdir=workdir,
                env_extra={**FAST_ENV, "SWITCHYARD_CONFIG": str(config)})
    procs = [c.worker(tier, concurrency=8, wait=False) for tier in ("triage", "sonnet", "opus", "validate")]
    procs.append(c.dispatcher(wait=False))
    try:
        # Longer than start_all's minute: on a shared 2-core machine five imports at once can take it.
        c.wait_ready(procs, timeout=240)
        yield c
    finally:
        c.stop()


def _enqueue(sessions: sessionmaker[Session], workdir: Path, name: str, jobs: list[dict[str, Any]],
             budget_usd: Decimal | None = None, shadow_rate: float | None = None) -> int:
    path = workdir / f"{name}.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    report = enqueue_file(sessions, path, batch=name, config=load_config(), mode="economy", budget_usd=budget_usd,
                          shadow_rate=shadow_rate)
    assert report.batch_id is not None and report.accepted == len(jobs)
    return report.batch_id


def _jobs(name: str, n: int, hint: str = "") -> list[dict[str, Any]]:
    kinds = ("classify", "extract", "draft", "generate")
    out: list[dict[str, Any]] = []
    for i in range(n):
        kind = kinds[i % 4]
        job: dict[str, Any] = {"key": f"{name}-{i}", "kind": kind}
        if kind == "classify":
            job |= {"text": f"{name} ticket {i}: charged twice. {hint}", "labels": LABELS}
        elif kind == "extract":
            job |= {"text": f"{name} receipt {i} for Dana Smith, 42.50 paid. {hint}",
                    "schema": {"type": "object", "properties": {"name": {"type": "string"},
                                                                "amount": {"type": "number"}},
                               "required": ["name", "amount"]}}
        elif kind == "draft":
            job |= {"instructions": f"{name}: reply to ticket {i} with an apology. {hint}",
                    "context": "Order late by 3 days."}
        else:
            job |= {"prompt": f"{name}: summarise item {i} in two lines. {hint}"}
        out.append(job)
    return out


def _batch_stats(fake: FakeClaude) -> dict[str, Any]:
    return dict(fake.stats()["batches"])


def _billed(fake: FakeClaude) -> int:
    return int(_batch_stats(fake)["results"].get("succeeded", 0))


def _check(sessions: sessionmaker[Session], fake: FakeClaude, batch_id: int, billed_before: int) -> list[ModelCall]:
    """The fault-matrix invariants, and every answer the fake billed in a message batch (since
    ``billed_before``) recorded as exactly one call row of this batch's jobs."""
    check_exactly_once(sessions, batch_id, fake=fake, max_attempts=int(FAST_ENV["SWITCHYARD_CALL_ATTEMPTS"]))
    with sessions() as s:
        calls = list(s.scalars(select(ModelCall).join(Job, Job.id == ModelCall.job_id)
                               .where(Job.batch_id == batch_id)))
        requests = s.scalars(select(EconomyRequest).join(Job, Job.id == EconomyRequest.job_id)
                             .where(Job.batch_id == batch_id)).all()
    batched_ok = [c for c in calls if c.message_batch_id is not None and c.outcome == "ok"]
    assert len(batched_ok) == _billed(fake) - billed_before, "a billed batch answer not recorded once"
    assert len({c.request_id for c in batched_ok}) == len(batched_ok), "one batch answer recorded twice"
    # Every request ended up read: none left pending, in a batch, or answered and unread.
    assert all(r.consumed_at is not None for r in requests), [(r.id, r.state) for r in requests
                                                             if r.consumed_at is None]
    return calls


def test_economy_end_to_end(sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude,
                            workdir: Path) -> None:
    """Every call of an economy batch goes through message batches, at half the standard price,
    with the same records; not one synchronous /v1/messages request."""
    fake.reset()  # its request log and counters are the case's own (the checks read them whole)
    sync_before, billed_before = fake.stats()["total"], _billed(fake)
    batch_id = _enqueue(sessions, workdir, "econ-e2e", _jobs("e2e", 12))
    wait_for_batch(sessions, batch_id, timeout=90, cluster=cluster)
    calls = _check(sessions, fake, batch_id, billed_before)
    assert fake.stats()["total"] == sync_before, "an economy job made a synchronous call"
    assert calls and all(c.message_batch_id and c.message_batch_id.startswith("msgbatch_") for c in calls)
    models = load_config()
    with sessions() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}
        batches = s.scalars(select(MessageBatch).where(MessageBatch.api_id.in_({c.message_batch_id for c in calls})))
        assert {b.state for b in batches} == {"ended"}
    for c in calls:
        # Priced at the batch discount: half of what the same tokens cost synchronously.
        from pipeline.claude.pricing import Usage, call_cost
        usage = Usage(c.input_tokens, c.output_tokens, c.cache_creation_input_tokens, c.cache_read_input_tokens)
        assert c.cost_usd == (call_cost(models.tier(c.tier), usage, config=models) * Decimal("0.5")).quantize(
            Decimal("0.00000001"))
        assert c.latency_ms and c.latency_ms >= 400  # from submission to result: the fake's 0.5 s at least
    # A job moved through its stages in successive message batches.
    first = min(jobs, key=lambda j: j.id)
    per_job = [c for c in calls if c.job_id == first.id]
    assert len({c.message_batch_id for c in per_job}) == len(per_job) >= 2
    out = run_cli(["jobs", "show", str(first.id), "--json"], env=cluster.env())
    shown = json.loads(out.stdout)
    assert {c["message_batch_id"] for c in shown["calls"]} == {c.message_batch_id for c in per_job}
    stats = json.loads(run_cli(["stats", "--batch", "econ-e2e", "--json"], env=cluster.env()).stdout)
    spent = sum((c.cost_usd for c in calls), Decimal(0))
    assert Decimal(str(stats["economy"]["saved_usd"])) == pytest.approx(spent, rel=Decimal("1e-6"))


def test_shadows_of_an_economy_batch_go_through_message_batches(
        sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude, workdir: Path) -> None:
    """Shadow evaluation of an economy batch: the reference call and the judge's go through message
    batches too, at the batch price, their cost on the shadow; not one synchronous request."""
    fake.reset()
    sync_before = fake.stats()["total"]
    batch_id = _enqueue(sessions, workdir, "econ-shadow", _jobs("shadow", 8), shadow_rate=1.0)
    wait_for_batch(sessions, batch_id, timeout=90, cluster=cluster)

    def shadows() -> list[ShadowEvaluation]:
        with sessions() as s:
            return list(s.scalars(select(ShadowEvaluation).join(Job).where(Job.batch_id == batch_id)))
    wait_for(lambda: bool(shadows()) and all(sh.status in (ShadowStatus.DONE, ShadowStatus.FAILED)
                                             for sh in shadows()),
             timeout=120, what="every shadow of the economy batch ended", interval=0.2)
    ended = shadows()
    assert {sh.status for sh in ended} == {ShadowStatus.DONE}, [(sh.job_id, sh.status, sh.error) for sh in ended]
    assert fake.stats()["total"] == sync_before, "a shadow of an economy job made a synchronous call"
    models = load_config()
    with sessions() as s:
        calls = s.scalars(select(ModelCall).join(Job).where(
            Job.batch_id == batch_id, ModelCall.stage.in_([Stage.SHADOW, Stage.JUDGE]))).all()
        unread = s.scalar(select(func.count()).select_from(EconomyRequest).join(Job).where(
            Job.batch_id == batch_id, EconomyRequest.consumed_at.is_(None)))
    assert {c.stage for c in calls} == {Stage.SHADOW, Stage.JUDGE}  # drafts and generations are judged
    assert all(c.message_batch_id and c.outcome == "ok" for c in calls), [(c.stage, c.outcome) for c in calls]
    assert not unread
    from pipeline.claude.pricing import Usage, call_cost
    for c in calls:
        usage = Usage(c.input_tokens, c.output_tokens, c.cache_creation_input_tokens, c.cache_read_input_tokens)
        assert c.cost_usd == call_cost(models.tier(c.tier), usage, config=models, batch=True)
    for sh in ended:
        assert sh.cost_usd == sum((c.cost_usd for c in calls if c.job_id == sh.job_id), Decimal(0))


def test_errored_expired_canceled(sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude,
                                  workdir: Path) -> None:
    """Errored once: retried in a later batch. Expired once: resubmitted; always: the standard path,
    noted on the job. Canceled (the job still live): made again. A permanent error fails the job."""
    fake.reset()
    sync_before, billed_before = fake.stats()["total"], _billed(fake)
    jobs = [*_jobs("errored", 2, "[fake:batch=errored] [fake:times=1]"),
            *_jobs("expired-once", 2, "[fake:batch=expired] [fake:times=1]"),
            *_jobs("canceled", 2, "[fake:batch=canceled] [fake:times=1]"),
            {"key": "always-expires", "kind": "generate", "prompt": "Summarise this. [fake:batch=expired]"},
            {"key": "doomed-refused", "kind": "generate", "prompt": "Summarise this. [fake:error=400]"}]
    batch_id = _enqueue(sessions, workdir, "econ-outcomes", jobs)
    wait_for_batch(sessions, batch_id, timeout=120, cluster=cluster)
    _check(sessions, fake, batch_id, billed_before)
    with sessions() as s:
        by_key = {j.key: j for j in s.scalars(select(Job).where(Job.batch_id == batch_id))}
        rounds = dict(s.execute(select(Job.key, func.max(EconomyRequest.round)).join(Job)
                                .where(Job.batch_id == batch_id).group_by(Job.key)).all())
        results = dict(s.execute(select(EconomyRequest.result_type, func.count()).join(Job)
                                 .where(Job.batch_id == batch_id).group_by(EconomyRequest.result_type)).all())
    assert {k: j.status for k, j in by_key.items() if k != "doomed-refused"} == dict.fromkeys(
        [k for k in by_key if k != "doomed-refused"], JobStatus.SUCCEEDED)
    assert by_key["doomed-refused"].status is JobStatus.FAILED
    assert "400 invalid_request_error" in (by_key["doomed-refused"].error or "")
    assert results.get("errored", 0) >= 2 + 1 and results.get("canceled", 0) >= 2 and results.get("expired", 0) >= 2
    assert rounds["expired-once-0"] == 2
    # Expired twice: that call went the standard path (one synchronous request per stage), noted.
    assert "expired twice" in (by_key["always-expires"].economy_note or "")
    assert fake.stats()["total"] > sync_before


def test_job_cancelled_in_a_message_batch(sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude,
                                          workdir: Path) -> None:
    """`switchyard cancel` while a job's request sits in a message batch: the job ends cancelled
    once, and the message batch (all of whose requests are the cancelled jobs') is cancelled at
    the API, its requests ending canceled, none billed."""
    # Batches that take long enough for the cancel to find the requests still in one.
    fake.reconfigure(FakeOptions(batch_delay_s=60))
    try:
        _cancel_case(sessions, cluster, fake, workdir)
    finally:
        fake.reconfigure(FakeOptions(batch_delay_s=0.5))


def _cancel_case(sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude, workdir: Path) -> None:
    billed_before = _billed(fake)
    batch_id = _enqueue(sessions, workdir, "econ-cancel", _jobs("cancel", 3))

    def submitted() -> bool:
        with sessions() as s:
            return bool(s.scalar(select(func.count()).select_from(EconomyRequest).join(Job).where(
                Job.batch_id == batch_id, EconomyRequest.state.in_(("submitting", "submitted")))))
    wait_for(submitted, timeout=60, what="a request of the batch in a message batch")
    run_cli(["cancel", "econ-cancel"], env=cluster.env())
    wait_for_batch(sessions, batch_id, timeout=60, cluster=cluster)

    def settled() -> bool:
        with sessions() as s:
            return not s.scalar(select(func.count()).select_from(EconomyRequest).join(Job).where(
                Job.batch_id == batch_id, EconomyRequest.consumed_at.is_(None)))
    wait_for(settled, timeout=30, what="every request of the cancelled jobs settled")
    _check(sessions, fake, batch_id, billed_before)
    with sessions() as s:
        statuses = set(s.scalars(select(Job.status).where(Job.batch_id == batch_id)))
        cancelled = s.scalars(select(MessageBatch.cancel_requested_at).join(
            EconomyRequest, EconomyRequest.message_batch_id == MessageBatch.id).join(Job).where(
            Job.batch_id == batch_id)).all()
    assert statuses == {JobStatus.CANCELLED}
    assert cancelled and all(at is not None for at in cancelled)
    assert _batch_stats(fake)["results"].get("canceled", 0) == 3


def test_a_budget_holds_while_requests_wait_in_message_batches(
        sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude, workdir: Path) -> None:
    """An economy call is paid when its message batch runs: its worst case stays reserved from
    the moment its request is written until its answer is applied, so a budget also covers the
    requests in flight. The jobs that do not fit pause; the batch never spends past its budget;
    every answer closes its own hold with its actual cost; raising the budget finishes the batch."""
    fake.reconfigure(FakeOptions(batch_delay_s=2))  # long enough to look at the holds in flight
    try:
        budget = Decimal("0.04")
        batch_id = _enqueue(sessions, workdir, "econ-budget", _jobs("budget", 12), budget_usd=budget)

        def in_flight() -> list[tuple[int, int | None]]:
            with sessions() as s:
                return [tuple(r) for r in s.execute(  # type: ignore[misc]
                    select(EconomyRequest.id, BudgetReservation.id).select_from(EconomyRequest)
                    .join(Job, Job.id == EconomyRequest.job_id)
                    .outerjoin(BudgetReservation, (BudgetReservation.economy_request_id == EconomyRequest.id)
                               & BudgetReservation.released_at.is_(None) & BudgetReservation.call_id.is_(None))
                    .where(Job.batch_id == batch_id, EconomyRequest.state == "submitted"))]
        wait_for(lambda: bool(in_flight()), timeout=60, what="a request of the batch in a message batch")
        held = in_flight()
        assert all(hold is not None for _, hold in held), f"requests in a message batch without a hold: {held}"

        def settled() -> bool:
            with sessions() as s:
                live = s.scalar(select(func.count()).select_from(Job).where(
                    Job.batch_id == batch_id, Job.status.not_in([*TERMINAL, JobStatus.PAUSED])))
                unread = s.scalar(select(func.count()).select_from(EconomyRequest).join(Job).where(
                    Job.batch_id == batch_id, EconomyRequest.consumed_at.is_(None)))
                holds = s.scalar(select(func.count()).select_from(BudgetReservation).where(
                    BudgetReservation.batch_id == batch_id, BudgetReservation.released_at.is_(None)))
            return not live and not unread and not holds
        wait_for(settled, timeout=120, what="the budgeted economy batch to run out of budget or finish", interval=0.2)
        with sessions() as s:
            spent = s.scalar(select(func.coalesce(func.sum(ModelCall.cost_usd), 0)).select_from(ModelCall)
                             .join(Job).where(Job.batch_id == batch_id))
            batch = s.get(Batch, batch_id)
            assert batch is not None
            paused_ever = s.scalar(select(func.count()).select_from(JobEvent).join(Job).where(
                Job.batch_id == batch_id, JobEvent.to_status == JobStatus.PAUSED))
            calls = s.scalars(select(ModelCall).join(Job).where(Job.batch_id == batch_id,
                                                                ModelCall.outcome == "ok")).all()
            holds = {h.call_id: h for h in s.scalars(select(BudgetReservation).where(
                BudgetReservation.batch_id == batch_id))}
        assert spent <= budget, (spent, budget)
        assert batch.budget_spent_usd == spent
        assert paused_ever, "no job paused: the budget was too large for this case to test anything"
        assert calls and all(c.message_batch_id for c in calls)
        # Each answer closed the hold that its request carried, with its actual cost.
        assert all(c.id in holds and holds[c.id].cost_usd == c.cost_usd for c in calls), \
            [(c.id, c.cost_usd, holds.get(c.id) and holds[c.id].cost_usd) for c in calls]

        run_cli(["batches", "budget", "econ-budget", "--usd", "100"], env=cluster.env())
        wait_for_batch(sessions, batch_id, timeout=120, cluster=cluster)
        with sessions() as s:
            statuses = set(s.scalars(select(Job.status).where(Job.batch_id == batch_id)))
            total = s.scalar(select(func.sum(ModelCall.cost_usd)).select_from(ModelCall).join(Job)
                             .where(Job.batch_id == batch_id))
            batch = s.get(Batch, batch_id)
            assert batch is not None
            assert batch.budget_spent_usd == total
        assert statuses == {JobStatus.SUCCEEDED}
    finally:
        fake.reconfigure(FakeOptions(batch_delay_s=0.5))


def _restart(cluster: Cluster, proc: Proc) -> Proc:
    """Start the dispatcher again and wait for it, longer than Cluster.restart's 30 s (a loaded
    2-core machine can take that to import it)."""
    new = cluster.restart(proc, wait_ready=False)
    wait_for(lambda: "dispatcher:" in new.log.read_text(errors="replace"), timeout=240, what="the dispatcher ready",
             interval=0.2)
    return new


def _kill_case(sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude, workdir: Path, point: str
               ) -> None:
    marker = workdir / f"killed-{point}"
    dispatcher = next(p for p in cluster.procs if p.name == "dispatcher")
    dispatcher.signal(signal.SIGTERM)
    dispatcher.popen.wait(20)
    cluster.env_extra["SWITCHYARD_TEST_ECONOMY_KILL"] = f"{point}={marker}"
    try:
        dispatcher = _restart(cluster, dispatcher)
        fake.reset()
        billed_before, created_before = _billed(fake), _batch_stats(fake)["requests"]
        batch_id = _enqueue(sessions, workdir, f"econ-kill-{point}", _jobs(f"kill-{point}", 4))
        wait_for(lambda: not dispatcher.alive, timeout=60, what=f"the dispatcher to kill itself at {point}")
        assert marker.exists()
        assert dispatcher.popen.returncode == -signal.SIGKILL
        dispatcher = _restart(cluster, dispatcher)
        wait_for_batch(sessions, batch_id, timeout=90, cluster=cluster)
        _check(sessions, fake, batch_id, billed_before)
        with sessions() as s:
            requests = s.scalar(select(func.count()).select_from(EconomyRequest).join(Job).where(
                Job.batch_id == batch_id, EconomyRequest.state != "dropped"))
        # Never submitted twice: the fake received each request of the batch once.
        assert _batch_stats(fake)["requests"] - created_before == requests
    finally:
        del cluster.env_extra["SWITCHYARD_TEST_ECONOMY_KILL"]


def test_dispatcher_killed_between_create_and_record(sessions: sessionmaker[Session], cluster: Cluster,
                                                     fake: FakeClaude, workdir: Path) -> None:
    """SIGKILL right after the API created a message batch, before its id was recorded: the
    restarted dispatcher finds it in the API's list and resumes it, and submits nothing twice."""
    _kill_case(sessions, cluster, fake, workdir, "after_create")
    with sessions() as s:
        assert not s.scalar(select(func.count()).select_from(MessageBatch).where(MessageBatch.state == "creating"))


def test_dispatcher_killed_while_polling(sessions: sessionmaker[Session], cluster: Cluster, fake: FakeClaude,
                                         workdir: Path) -> None:
    """SIGKILL while storing a batch's results: the restarted dispatcher polls the open batch
    again, and stores each result once."""
    _kill_case(sessions, cluster, fake, workdir, "while_polling")
