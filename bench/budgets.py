"""Budgets, figure 1 (overrun): a batch whose budget is a third of what it costs in full, worked by
workers with ~C calls in flight at once (a slow fake), while the work tier's worker is SIGKILLed
mid-call twice and restarted. Two figures, against the budget:

- actual spend / budget, when the batch has run out (nothing running, nothing reserved, jobs
  paused): the guarantee says at most 1;
- the same spend read as how close spending got to the budget before the jobs paused: at least 0.9.

"Full cost" is measured, not guessed: a small calibration batch of the same jobs sets the budget,
and once the budgeted batch has paused its budget is raised and the batch finished, so the figures
also report the budget's share of what the batch cost in the end (~1/3).

The jobs are generations pinned to opus, under a configuration whose work calls ask for 64 tokens at
most (the fake answers in ~50): a call's worst case is then about twice its actual cost, so a third
of the batch's cost can hold C worst cases at once and the workers really have C calls in flight
against it. With the defaults' 2,048 tokens the same figures hold, with fewer calls in flight.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import func, select

from bench import env
from bench.report import Figure
from pipeline.config import load_config
from pipeline.db import make_engine, session_factory
from pipeline.flow.budgets import check_budget, set_budget, states
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import ACTIVE, BudgetReservation, Job, JobStatus, ModelCall

WORK_MAX_TOKENS = 64
CALIBRATION_JOBS = 30
KILLS_AT = (0.4, 0.8)  # SIGKILL the opus worker when spend reaches these shares of the budget


@dataclass
class Run:
    jobs: int
    in_flight_target: int
    budget: Decimal = Decimal(0)
    per_job: Decimal = Decimal(0)
    spent_at_pause: Decimal = Decimal(0)
    spent_counter: Decimal = Decimal(0)
    full_cost: Decimal = Decimal(0)
    paused: int = 0
    succeeded_at_pause: int = 0
    max_calls_in_flight: int = 0
    max_reserved: Decimal = Decimal(0)
    kills: list[dict[str, Any]] = field(default_factory=list)
    released_dead: int = 0
    seconds: float = 0.0


def _config(workdir: Path) -> Path:
    text = resources.files("pipeline").joinpath("defaults.toml").read_text()
    path = workdir / "budgets.toml"
    path.write_text(text.replace("work_max_tokens = 2048", f"work_max_tokens = {WORK_MAX_TOKENS}"))
    return path


def _jobs_file(path: Path, n: int, tag: str) -> Path:
    path.write_text("".join(json.dumps({"key": f"{tag}{i}", "kind": "generate", "tier": "opus",
                                        "prompt": f"Five subject lines for sale {tag}{i}"}) + "\n" for i in range(n)))
    return path


def measure(*, n: int, in_flight: int, latency_ms: float, console: Console, stage_deadline_s: float = 60.0) -> Run:
    run = Run(jobs=n, in_flight_target=in_flight)
    with env.workdir() as workdir, env.scratch_database("sy_bench_budgets") as db:
        config_path = _config(workdir)
        models = load_config(config_path)
        engine = make_engine(db, pool_size=2)
        sessions = session_factory(engine)
        e = env.switchyard_env(database_url=db, broker=env.broker_url(), claude_url="",
                               SWITCHYARD_CONFIG=str(config_path), SWITCHYARD_CLAIM_DEADLINE_S="15",
                               SWITCHYARD_CALL_TIMEOUT_S="30",
                               # The killed worker's prefetched messages, never begun, are lost with it:
                               # the sweeper republishes them after this (600 s by default here).
                               SWITCHYARD_STAGE_DEADLINE_S=f"{stage_deadline_s:g}")
        with env.Processes(e, workdir=workdir) as procs:
            fake = env.start_fake(procs, latency_ms=latency_ms)
            env.start_together(procs, {"opus": in_flight, "validate": in_flight},
                               env={"ANTHROPIC_BASE_URL": fake.url})

            def cost(batch_id: int) -> Decimal:
                with sessions() as s:
                    return Decimal(s.scalar(select(func.coalesce(func.sum(ModelCall.cost_usd), 0))
                                            .join(Job, Job.id == ModelCall.job_id)
                                            .where(Job.batch_id == batch_id)) or 0)

            def count(batch_id: int, *statuses: JobStatus) -> int:
                with sessions() as s:
                    return s.scalar(select(func.count()).select_from(Job).where(
                        Job.batch_id == batch_id, Job.status.in_(statuses))) or 0

            # Calibration: what one job costs in full, unbudgeted.
            cal = enqueue_file(sessions, _jobs_file(workdir / "calibration.jsonl", CALIBRATION_JOBS, "c"),
                               batch="calibration", config=models).batch_id
            assert cal is not None
            env.wait_until(lambda: count(cal, JobStatus.SUCCEEDED, JobStatus.FAILED) == CALIBRATION_JOBS,
                           timeout=300, procs=procs, what="the calibration batch")
            run.per_job = cost(cal) / CALIBRATION_JOBS
            run.budget = check_budget((run.per_job * n / 3).quantize(Decimal("0.00000001")))
            console.print(f"  one job costs ${run.per_job:.6f}: budget ${run.budget:.4f} for {n:,} jobs")

            t0 = time.monotonic()
            batch_id = enqueue_file(sessions, _jobs_file(workdir / "budgeted.jsonl", n, "b"), batch="budgeted",
                                    config=models, budget_usd=run.budget).batch_id
            assert batch_id is not None
            kills = list(KILLS_AT)
            while True:
                with sessions() as s:
                    held = s.execute(select(func.count(), func.coalesce(func.sum(BudgetReservation.amount_usd), 0))
                                     .where(BudgetReservation.batch_id == batch_id,
                                            BudgetReservation.released_at.is_(None))).one()
                    busy = s.scalar(select(func.count()).select_from(Job).where(
                        Job.batch_id == batch_id, Job.status.in_([JobStatus.QUEUED, *ACTIVE]))) or 0
                    spent = Decimal(states(s, [batch_id])[batch_id].spent_usd)
                run.max_calls_in_flight = max(run.max_calls_in_flight, int(held[0]))
                run.max_reserved = max(run.max_reserved, Decimal(held[1]))
                if kills and spent >= run.budget * Decimal(str(kills[0])):
                    kills.pop(0)
                    victim = next(p for p in procs.procs if p.name == "worker-opus" and p.alive)
                    run.kills.append({"at_spent_share": float(spent / run.budget), "calls_in_flight": int(held[0])})
                    victim.popen.send_signal(signal.SIGKILL)
                    victim.popen.wait(10)
                    procs.procs.remove(victim)
                    # A loaded machine may take more than a minute to start it again.
                    procs.start("worker-opus", env.switchyard("worker", "--tier", "opus", "--concurrency",
                                                              str(in_flight)), ready=" ready.", timeout=600,
                                env={"ANTHROPIC_BASE_URL": fake.url})
                    console.print(f"  SIGKILLed the opus worker with {held[0]} calls in flight, at "
                                  f"{spent / run.budget:.0%} of the budget; restarted it")
                if busy == 0 and held[0] == 0:
                    break
                procs.check()
                if time.monotonic() - t0 > 1800:
                    raise TimeoutError("the budgeted batch did not run out of budget in 30 minutes")
                time.sleep(0.2)
            run.seconds = time.monotonic() - t0
            run.spent_at_pause = cost(batch_id)
            run.paused = count(batch_id, JobStatus.PAUSED)
            run.succeeded_at_pause = count(batch_id, JobStatus.SUCCEEDED)
            with sessions() as s:
                run.spent_counter = Decimal(states(s, [batch_id])[batch_id].spent_usd)
                run.released_dead = s.scalar(select(func.count()).select_from(BudgetReservation)
                                             .join(ModelCall, ModelCall.id == BudgetReservation.call_id)
                                             .where(BudgetReservation.batch_id == batch_id,
                                                    ModelCall.outcome == "abandoned")) or 0
                # Raised: the paused jobs resume and the batch finishes, for its full cost.
                set_budget(s, batch_id, run.budget * 100)
                s.commit()
            env.wait_until(lambda: count(batch_id, JobStatus.SUCCEEDED, JobStatus.FAILED) == n, timeout=900,
                           procs=procs, what="the budgeted batch, its budget raised")
            run.full_cost = cost(batch_id)
        engine.dispose()
    return run


def figures(run: Run, *, latency_ms: float) -> list[Figure]:
    extra = {"jobs": run.jobs, "worker_threads": run.in_flight_target, "latency_ms": latency_ms,
             "max_calls_in_flight": run.max_calls_in_flight, "max_reserved_usd": float(run.max_reserved),
             "budget_usd": float(run.budget), "spent_usd": float(run.spent_at_pause),
             "full_cost_usd": float(run.full_cost),
             "budget_share_of_full_cost": float(run.budget / run.full_cost) if run.full_cost else None,
             "jobs_paused": run.paused, "jobs_succeeded_before_pause": run.succeeded_at_pause,
             "kills": run.kills, "dead_reservations_released": run.released_dead,
             "seconds_to_pause": round(run.seconds, 1)}
    note = (f"{run.jobs:,} jobs, up to {run.max_calls_in_flight} calls in flight, opus worker SIGKILLed "
            f"{len(run.kills)}x mid-call")
    return [
        Figure("budgets", "actual spend / budget", float(run.spent_at_pause), "usd", baseline=float(run.budget),
               baseline_name="the batch's budget", target=1.0, target_kind="ratio<=", note=note, extra=extra),
        Figure("budgets", "spend when the jobs paused / budget", float(run.spent_at_pause), "usd",
               baseline=float(run.budget), baseline_name="the batch's budget", target=0.9, target_kind="ratio>=",
               note=note, extra=extra),
    ]


def run(*, quick: bool, console: Console, profile: bool = False) -> list[Figure]:
    """``profile`` is not offered: the figures are dollars, not time."""
    n, in_flight, latency = (360, 60, 1000.0) if quick else (1200, 200, 2000.0)
    kills = ", ".join(f"{k:.0%}" for k in KILLS_AT)
    console.print(f"[bold]budgets[/]: {n:,} opus jobs, budget a third of their cost, {in_flight} worker threads, "
                  f"fake latency {latency:.0f} ms, the opus worker SIGKILLed at {kills} of the budget")
    # The quick size waits 12 s, not 60, for what a killed worker held but never began: its calls
    # take 1 s, and the wait is most of a quick run.
    result = measure(n=n, in_flight=in_flight, latency_ms=latency, console=console,
                     stage_deadline_s=12.0 if quick else 60.0)
    if result.spent_counter != result.spent_at_pause:
        raise RuntimeError(f"the batch's spent counter (${result.spent_counter}) is not the sum of its calls' "
                           f"costs (${result.spent_at_pause})")
    console.print(f"  spent ${result.spent_at_pause:.4f} of ${result.budget:.4f} "
                  f"({result.spent_at_pause / result.budget:.3f}); {result.paused} jobs paused; full cost "
                  f"${result.full_cost:.4f}; {result.released_dead} dead reservations released")
    return figures(result, latency_ms=latency)
