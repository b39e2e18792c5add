"""Benchmark 7: economy mode (Message Batches) against standard, on the same jobs.

The same 1,000 mixed jobs (every kind; hints that send some to Opus, make some retry once, make
triage unsure, pin a few tiers) run twice through the real workers and dispatcher against the fake
Claude over HTTP, each run on a new database, broker and fake: once enqueued in standard mode, once
with ``--mode economy`` (the API's ``mode``), where every call goes through the fake's Message
Batches API. The fake answers a request the same in a batch as synchronously, so the two runs take
the same routes and the same tokens; the economy run's configuration submits a model's pending
calls once the oldest has waited 1 s and polls every 0.5 s, and the fake ends a batch 1 s after its
creation (``--batch-delay-s``): the hours a real batch may take, shortened.

Figures: the cost of the economy run against the standard run's (target 0.50 ± 0.01: the batch
multiplier, 0.5, on every token), the synchronous /v1/messages requests the fake served during the
economy run (target 0), and each run's time from enqueue to the last job ended (stated, no target:
economy's is the batches' delay times the stages a job goes through).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path

from rich.console import Console
from sqlalchemy import func, select

from bench import env
from bench.jobs import job_of_kind, write_jsonl
from bench.report import Figure
from pipeline.config import load_config
from pipeline.db import make_engine, session_factory
from pipeline.models import Job, JobStatus, ModelCall

NAME = "economy"
TIERS = ("triage", "sonnet", "opus", "validate")
RATIO_TARGET = 0.5
RATIO_TOLERANCE = 0.01
LABELS = ["billing", "shipping", "account", "other"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
          "required": ["name", "amount"]}
ECONOMY_TOML = """
[economy]
max_requests = 100000
max_age_s = 1
poll_interval_s = 0.5
create_timeout_s = 30
"""


def mixed_jobs(n: int, seed: int = 7) -> list[dict[str, object]]:
    """Every kind in turn, a tenth pinned, and hints that steer routing the same way in both runs."""
    rng = random.Random(seed)
    jobs: list[dict[str, object]] = []
    for i in range(n):
        hint = rng.choice(["", "", "", "[fake:difficulty=hard]", "[fake:difficulty=easy]", "[fake:invalid_once]",
                           "[fake:confidence=0.2]"])
        kind = ("classify", "extract", "draft", "generate")[i % 4]
        job = job_of_kind(i, kind, hint, labels=LABELS, schema=SCHEMA)
        if i % 10 == 0:
            job["tier"] = "opus" if i % 20 == 0 else "sonnet"
        jobs.append(job)
    return jobs


@dataclass
class Run:
    mode: str
    jobs: int
    seconds: float
    succeeded: int
    cost: Decimal
    calls: int
    batched_calls: int
    sync_requests: int  # synchronous /v1/messages requests the fake served
    batch_requests: int  # requests it received in message batches
    message_batches: int


def measure(mode: str, *, n: int, workdir: Path, console: Console, batch_delay_s: float, latency_ms: float,
            concurrency: dict[str, int]) -> Run:
    defaults = resources.files("pipeline").joinpath("defaults.toml").read_text()
    config_path = workdir / "economy.toml"
    config_path.write_text(re.sub(r"\n\[economy\][^\[]*", "\n", defaults) + ECONOMY_TOML)
    models = load_config(config_path)
    broker = env.broker_url()
    with env.scratch_database() as db:
        engine = make_engine(db, pool_size=2)
        sessions = session_factory(engine)
        e = env.switchyard_env(database_url=db, broker=broker, claude_url="", SWITCHYARD_CONFIG=str(config_path))
        with env.Processes(e, workdir=workdir) as procs:
            fake = env.start_fake(procs, latency_ms=latency_ms, args=["--batch-delay-s", str(batch_delay_s)])
            env.start_together(procs, concurrency, env={"ANTHROPIC_BASE_URL": fake.url})
            path = write_jsonl(workdir / f"jobs-{mode}.jsonl", mixed_jobs(n))
            console.print(f"  {mode}: {n:,} jobs ...")
            t0 = time.monotonic()
            batch_id = env.enqueue_all(sessions, path, n=n, batch=f"economy-{mode}", config=models, mode=mode)
            t1 = env.wait_until(env.batch_ended(sessions, batch_id, n), timeout=900, interval=0.2, procs=procs,
                                what=f"the {mode} batch")
            stats = fake.stats()
        with sessions() as s:
            succeeded = s.scalar(select(func.count()).where(Job.batch_id == batch_id,
                                                            Job.status == JobStatus.SUCCEEDED)) or 0
            cost = s.scalar(select(func.coalesce(func.sum(Job.cost_usd), 0)).where(Job.batch_id == batch_id))
            calls, batched = s.execute(
                select(func.count(), func.count(ModelCall.message_batch_id))
                .join(Job, Job.id == ModelCall.job_id).where(Job.batch_id == batch_id)).one()
        engine.dispose()
    batches = stats.get("batches", {})
    return Run(mode, n, t1 - t0, succeeded, Decimal(cost or 0), int(calls), int(batched), int(stats["total"]),
               int(batches.get("requests", 0)), int(batches.get("created", 0)))


def run(*, quick: bool, console: Console, profile: bool = False, jobs: int | None = None) -> list[Figure]:
    """``profile`` is not offered: the figures are dollars and request counts."""
    n = jobs or (60 if quick else 1_000)
    delay, latency = 1.0, 200.0
    concurrency = dict.fromkeys(TIERS, 16 if quick else 32)
    console.print(f"[bold]economy[/]: {n:,} mixed jobs, standard then economy; fake latency {latency:.0f} ms, "
                  f"message batches end {delay:g} s after creation, worker threads {concurrency}")
    with env.workdir() as workdir:
        std = measure("standard", n=n, workdir=workdir, console=console, batch_delay_s=delay, latency_ms=latency,
                      concurrency=concurrency)
        eco = measure("economy", n=n, workdir=workdir, console=console, batch_delay_s=delay, latency_ms=latency,
                      concurrency=concurrency)
    ratio = float(eco.cost / std.cost) if std.cost else 0.0
    extra = {"jobs": n, "batch_delay_s": delay, "latency_ms": latency, "concurrency": concurrency,
             "standard": vars(std) | {"cost": f"{std.cost:f}"}, "economy": vars(eco) | {"cost": f"{eco.cost:f}"}}
    console.print(f"  standard: {std.succeeded}/{n} succeeded, {std.calls:,} calls, ${std.cost:.4f}, "
                  f"{std.seconds:.1f} s; economy: {eco.succeeded}/{n} succeeded, {eco.calls:,} calls "
                  f"({eco.batched_calls:,} in {eco.message_batches} message batches), ${eco.cost:.4f}, "
                  f"{eco.seconds:.1f} s")
    if eco.succeeded != std.succeeded or eco.calls != std.calls:
        console.print(f"  [yellow]the two runs differ[/]: {std.succeeded} vs {eco.succeeded} succeeded, "
                      f"{std.calls} vs {eco.calls} calls")
    return [
        Figure(NAME, "cost of the batch, economy vs standard", float(eco.cost), "USD", baseline=float(std.cost),
               baseline_name="standard", extra=extra),
        Figure(NAME, "economy/standard cost ratio: distance from 0.50", abs(ratio - RATIO_TARGET), "",
               target=RATIO_TOLERANCE, target_kind="<=", note=f"ratio {ratio:.4f}", extra=extra),
        Figure(NAME, "synchronous /v1/messages requests in the economy run", float(eco.sync_requests), "requests",
               target=0, target_kind="<=", note=f"{eco.batch_requests:,} requests in message batches", extra=extra),
        Figure(NAME, "time from enqueue to the last job, economy", eco.seconds, "s", baseline=std.seconds,
               baseline_name="standard", note=f"message batches end {delay:g} s after creation", extra=extra),
    ]
