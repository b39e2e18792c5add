"""Benchmark 1: orchestration overhead, with the fake Claude answering at once.

switchyard: jobs per second from the start of the enqueue until every job of the batch is
terminal, through the real worker processes (triage, sonnet, opus, validate) and the dispatcher.
Baseline, in the same run: the bare Celery app of ``bench.bare`` (same broker, same worker
settings, same pool and concurrency) passing each job through three tasks on three queues, each
making one row update; timed from inserting the rows until every row has passed the third task.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from celery import Celery
from rich.console import Console
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench import env
from bench.bare import CREATE, QUEUES, TABLE, make_bare_app
from bench.jobs import classify_jobs, write_jsonl
from bench.profile import CpuMeter, Recorder, postgres_pids
from bench.report import Figure
from pipeline.db import make_engine, session_factory
from pipeline.flow import stages
from pipeline.flow.dispatch import dispatch
from pipeline.flow.prompts import triage_prompt
from pipeline.flow.runtime import build_pipeline
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobKind, JobStatus
from pipeline.queries.report import terminal_count
from pipeline.settings import Settings

NAME = "overhead"
WARMUP = 50
TIERS = ("triage", "sonnet", "opus", "validate")


@dataclass
class Run:
    jobs: int
    seconds: float
    ok: int
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process, during the batch

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def _switchyard_batch(sessions: sessionmaker[Session], settings: Settings, path: Path, batch: str,
                      procs: env.Processes, timeout: float) -> Run:
    n = sum(1 for _ in path.open())
    t0 = time.monotonic()
    report = enqueue_file(sessions, path, batch=batch, config=settings.models)
    assert report.batch_id is not None and report.accepted == n, report

    def done() -> bool:
        with sessions() as s:
            finished, _ = terminal_count(s, batch_id=report.batch_id)  # type: ignore[arg-type]
        return finished == n

    t1 = env.wait_until(done, timeout=timeout, interval=0.05, procs=procs, what=f"switchyard batch {batch}")
    with sessions() as s:
        ok = s.scalar(select(func.count()).where(Job.batch_id == report.batch_id,
                                                 Job.status == JobStatus.SUCCEEDED)) or 0
    return Run(n, t1 - t0, ok)


def _meter(procs: env.Processes, database_url: str, extra: list[env.Proc]) -> CpuMeter:
    meter = CpuMeter()
    for p in [*procs.procs, *extra]:
        meter.add(p.name, partial(list, (p.pid,)))  # the process's pid, the same one every time
    engine = make_engine(database_url, pool_size=1)
    meter.add("postgres", lambda: postgres_pids(engine, engine.url.database or ""))
    meter.add("bench (enqueue, publish, poll)", lambda: [os.getpid()])
    return meter


def measure_switchyard(database_url: str, broker: str, fake: env.Fake, workdir: Path, *, n: int,
                       concurrency: int, console: Console, profile: bool = False,
                       extra_env: dict[str, str] | None = None) -> Run:
    settings = Settings(DATABASE_URL=database_url, BROKER_URL=broker)
    sessions = session_factory(make_engine(database_url, pool_size=2))
    e = env.switchyard_env(database_url=database_url, broker=broker, claude_url=fake.url, **(extra_env or {}))
    with env.Processes(e, workdir=workdir) as procs:
        for tier in TIERS:
            env.start_worker(procs, tier, concurrency=concurrency)
        env.start_dispatcher(procs)
        _switchyard_batch(sessions, settings, write_jsonl(workdir / "warm.jsonl", classify_jobs(WARMUP, prefix="w")),
                          "overhead-warmup", procs, timeout=120)
        path = write_jsonl(workdir / "jobs.jsonl", classify_jobs(n))
        console.print(f"  switchyard: {n:,} jobs through {len(TIERS)} workers (concurrency {concurrency}) ...")
        meter = _meter(procs, database_url, [fake.proc])
        recorder = _recorder("switchyard", procs) if profile else None
        meter.start()
        run = _switchyard_batch(sessions, settings, path, f"overhead-{time.time_ns()}", procs, timeout=60 + n / 5)
        run.cpu = meter.stop()
        if recorder:
            recorder.stop()
        return run


def _bare_batch(database_url: str, bare_app: Celery, first_id: int, n: int, procs: env.Processes,
                timeout: float) -> Run:
    engine = make_engine(database_url, pool_size=2)
    ids = list(range(first_id, first_id + n))
    t0 = time.monotonic()
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {TABLE} (id) SELECT * FROM unnest(CAST(:ids AS bigint[]))"), {"ids": ids})
    with bare_app.producer_or_acquire() as producer:
        for i in ids:
            bare_app.send_task("bare.step", args=[i, 1], queue=QUEUES[0], producer=producer)

    def done() -> bool:
        with engine.connect() as conn:
            return conn.scalar(text(f"SELECT count(*) FROM {TABLE} WHERE id >= :a AND id < :b AND step = 3"),
                               {"a": first_id, "b": first_id + n}) == n

    t1 = env.wait_until(done, timeout=timeout, interval=0.05, procs=procs, what="bare batch")
    engine.dispose()
    return Run(n, t1 - t0, n)


def _recorder(label: str, procs: env.Processes) -> Recorder:
    recorder = Recorder(f"overhead-{label}")
    for p in procs.procs:
        if p.name != "fake-claude":
            recorder.attach(p)
    time.sleep(1)  # py-spy takes a moment to attach
    return recorder


def measure_bare(database_url: str, broker: str, workdir: Path, *, n: int, concurrency: int,
                 console: Console, profile: bool = False) -> Run:
    publisher = make_bare_app(Settings(BROKER_URL=broker, DATABASE_URL=database_url))
    engine = make_engine(database_url, pool_size=1)
    with engine.begin() as conn:
        conn.execute(text(CREATE))
    engine.dispose()
    e = env.switchyard_env(database_url=database_url, broker=broker, claude_url="http://127.0.0.1:9",
                           BARE_CONCURRENCY=str(concurrency))
    with env.Processes(e, workdir=workdir) as procs:
        for q in QUEUES:
            procs.start(f"bare-{q}", [sys.executable, "-m", "celery", "-A", "bench.bare", "worker", "-Q", q,
                                      "-P", "threads", "-c", str(concurrency), "-n", f"{q}@%h", "-l", "INFO",
                                      "--without-mingle", "--without-gossip"], ready=" ready.")
        _bare_batch(database_url, publisher, 1, WARMUP, procs, timeout=120)
        console.print(f"  bare Celery: {n:,} jobs through {len(QUEUES)} workers (concurrency {concurrency}) ...")
        meter = _meter(procs, database_url, [])
        recorder = _recorder("bare", procs) if profile else None
        meter.start()
        run = _bare_batch(database_url, publisher, 1_000_000, n, procs, timeout=60 + n / 5)
        run.cpu = meter.stop()
        if recorder:
            recorder.stop()
        return run


def measure_stages(database_url: str, fake_url: str, workdir: Path, *, n: int) -> dict[str, float]:
    """CPU ms per job of each stage called as a plain function in this process, one job at a time,
    against the same Postgres and fake Claude: switchyard's own work (claim, model call, result)
    with no broker, no Celery and no threads. Also the model call alone, through ClaudeClient and
    the SDK. What a worker's CPU per job adds to these is Celery's cost of a hop."""
    settings = Settings(DATABASE_URL=database_url, ANTHROPIC_BASE_URL=fake_url, ANTHROPIC_API_KEY="bench-key")
    p = build_pipeline(settings, concurrency=1)
    path = write_jsonl(workdir / "stages.jsonl", classify_jobs(n, prefix="s"))
    enqueue_file(p.sessions, path, batch=f"overhead-stages-{time.time_ns()}", config=settings.models)
    handoffs = p.run(lambda s: dispatch(s, max_in_flight=n, limit=n))
    run = {"triage": stages.triage, "work": stages.work, "validate": stages.validate}
    cpu: dict[str, float] = {}
    while handoffs:
        stage = handoffs[0].stage
        now = [h for h in handoffs if h.stage == stage]
        t0 = time.process_time()
        after = [run[stage](p, h.job_id) for h in now]
        cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - t0
        handoffs = [h for h in handoffs if h.stage != stage] + [h for h in after if h is not None]
    prompt = triage_prompt(JobKind.CLASSIFY, classify_jobs(1)[0])
    tier = settings.models.triage_tier
    t0 = time.process_time()
    for _ in range(n):
        p.client.call(tier=tier, model=settings.models.tier(tier).model, system=prompt.system, user=prompt.user,
                      max_tokens=settings.models.limits.triage_max_tokens)
    cpu["model call alone"] = time.process_time() - t0
    p.engine.dispose()
    return {k: 1000 * v / n for k, v in cpu.items()}


def _cpu_line(run: Run) -> str:
    per_job = {k: 1000 * v / run.jobs for k, v in sorted(run.cpu.items(), key=lambda kv: -kv[1]) if v}
    return ", ".join(f"{k} {v:.1f}" for k, v in per_job.items())


def run(*, quick: bool, console: Console, jobs: int | None = None, concurrency: int = 16,
        profile: bool = False) -> list[Figure]:
    n = jobs or (1000 if quick else 5000)
    console.print(f"[bold]overhead[/]: {n:,} classify jobs, fake Claude at zero latency")
    broker = env.broker_url()
    with env.scratch_database() as db, env.workdir() as wd, \
            env.Processes(env.switchyard_env(database_url=db, broker=broker, claude_url=""), workdir=wd) as procs:
        fake = env.start_fake(procs, latency_ms=0)
        bare = measure_bare(db, broker, procs.workdir, n=n, concurrency=concurrency, console=console,
                            profile=profile)
        console.print(f"  bare Celery: {bare.rate:.1f} jobs/s ({bare.seconds:.1f} s); CPU ms per job: "
                      f"{_cpu_line(bare)}")
        env.broker_url()  # empty the broker between the two
        sy = measure_switchyard(db, broker, fake, procs.workdir, n=n, concurrency=concurrency, console=console,
                                profile=profile)
        note = "" if sy.ok == sy.jobs else f"only {sy.ok}/{sy.jobs} succeeded"
        console.print(f"  switchyard: {sy.rate:.1f} jobs/s ({sy.seconds:.1f} s) {note}; CPU ms per job: "
                      f"{_cpu_line(sy)}")
        alone = measure_stages(db, fake.url, procs.workdir, n=min(n, 1000))
    console.print("  the stages as plain functions, no broker (CPU ms per job): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in alone.items()))
    return [Figure(NAME, f"jobs/s, {n:,} jobs enqueue→terminal", sy.rate, "jobs/s", baseline=bare.rate,
                   baseline_name="bare Celery", target=0.8, note=note,
                   extra={"jobs": n, "concurrency": concurrency, "switchyard_s": sy.seconds, "bare_s": bare.seconds,
                          "succeeded": sy.ok, "cpu_s_switchyard": sy.cpu, "cpu_s_bare": bare.cpu,
                          "stages_alone_cpu_ms_per_job": alone})]
