"""Benchmark 1: orchestration overhead, with the fake Claude answering at once.

switchyard: jobs per second from the start of the enqueue until every job of the batch is
terminal, through the real worker processes (triage, sonnet, opus, validate) and the dispatcher.
Its baseline, in the same run and on the same jobs: the hand-written Celery chain of ``bench.peer``
(same broker, worker settings, pool and concurrency; the same SDK calls against the same fake; one
row update per hop and nothing else), timed from inserting its rows until every row is judged.
And as a diagnostic, the bare Celery app of ``bench.bare``: three hops of one row update each and
no model call, what Celery alone costs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from celery import Celery
from rich.console import Console
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench import env
from bench.bare import CREATE, QUEUES, TABLE, make_bare_app
from bench.jobs import classify_jobs, write_jsonl
from bench.peer import CREATE as PEER_CREATE
from bench.peer import QUEUES as PEER_QUEUES
from bench.peer import TABLE as PEER_TABLE
from bench.peer import make_peer_app
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
        env.start_together(procs, dict.fromkeys(TIERS, concurrency), env={})
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


def _chain_batch(database_url: str, app: Celery, table: str, first_id: int, jobs: list[dict[str, Any]],
                 procs: env.Processes, timeout: float, *, peer: bool) -> Run:
    """One batch through a chain of Celery tasks (the bare app's, or the peer's): the rows inserted,
    a message per job published, timed until every row has passed the last task."""
    engine = make_engine(database_url, pool_size=2)
    n = len(jobs)
    ids = list(range(first_id, first_id + n))
    t0 = time.monotonic()
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} (id) SELECT * FROM unnest(CAST(:ids AS bigint[]))"), {"ids": ids})
    with app.producer_or_acquire() as producer:
        for i, job in zip(ids, jobs, strict=True):
            if peer:
                app.send_task("peer.triage", args=[i, job], queue=PEER_QUEUES[0], producer=producer)
            else:
                app.send_task("bare.step", args=[i, 1], queue=QUEUES[0], producer=producer)
    finished = "status IN ('succeeded', 'failed')" if peer else "step = 3"

    def done() -> bool:
        with engine.connect() as conn:
            return conn.scalar(text(f"SELECT count(*) FROM {table} WHERE id >= :a AND id < :b AND {finished}"),
                               {"a": first_id, "b": first_id + n}) == n

    t1 = env.wait_until(done, timeout=timeout, interval=0.05, procs=procs, what=f"{table} batch")
    ok = n
    if peer:
        with engine.connect() as conn:
            ok = conn.scalar(text(f"SELECT count(*) FROM {table} WHERE id >= :a AND id < :b AND status = 'succeeded'"),
                             {"a": first_id, "b": first_id + n}) or 0
    engine.dispose()
    return Run(n, t1 - t0, ok)


def _recorder(label: str, procs: env.Processes) -> Recorder:
    recorder = Recorder(f"overhead-{label}")
    for p in procs.procs:
        if p.name != "fake-claude":
            recorder.attach(p)
    time.sleep(1)  # py-spy takes a moment to attach
    return recorder


def measure_chain(database_url: str, broker: str, workdir: Path, *, n: int, concurrency: int, console: Console,
                  peer: bool, fake: env.Fake | None = None, profile: bool = False) -> Run:
    """The bare Celery app (``peer=False``: three hops of one UPDATE each, no model call) or the
    hand-written peer chain (``bench.peer``: the same model calls as switchyard, against ``fake``)."""
    module, queues, table, create = (("bench.peer", PEER_QUEUES, PEER_TABLE, PEER_CREATE) if peer
                                     else ("bench.bare", QUEUES, TABLE, CREATE))
    settings = Settings(BROKER_URL=broker, DATABASE_URL=database_url)
    publisher = make_peer_app(settings) if peer else make_bare_app(settings)
    engine = make_engine(database_url, pool_size=1)
    with engine.begin() as conn:
        conn.execute(text(create))
    engine.dispose()
    e = env.switchyard_env(database_url=database_url, broker=broker,
                           claude_url=fake.url if fake is not None else "http://127.0.0.1:9",
                           BARE_CONCURRENCY=str(concurrency))
    label = "peer chain" if peer else "bare Celery"
    with env.Processes(e, workdir=workdir) as procs:
        # Started at once, as switchyard's side starts its workers.
        env.start_at_once(procs, [(f"{'peer' if peer else 'bare'}-{q}", [
            sys.executable, "-m", "celery", "-A", module, "worker", "-Q", q, "-P", "threads", "-c",
            str(concurrency), "-n", f"{q}@%h", "-l", "INFO", "--without-mingle", "--without-gossip"], " ready.")
            for q in queues])
        _chain_batch(database_url, publisher, table, 1, classify_jobs(WARMUP, prefix="w"), procs, timeout=120,
                     peer=peer)
        console.print(f"  {label}: {n:,} jobs through {len(queues)} workers (concurrency {concurrency}) ...")
        meter = _meter(procs, database_url, [fake.proc] if fake is not None else [])
        recorder = _recorder("peer" if peer else "bare", procs) if profile else None
        meter.start()
        run = _chain_batch(database_url, publisher, table, 1_000_000, classify_jobs(n), procs,
                           timeout=60 + n / 5, peer=peer)
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
    n = jobs or (400 if quick else 5000)
    console.print(f"[bold]overhead[/]: {n:,} classify jobs, fake Claude at zero latency")
    broker = env.broker_url()
    with env.scratch_database() as db, env.workdir() as wd, \
            env.Processes(env.switchyard_env(database_url=db, broker=broker, claude_url=""), workdir=wd) as procs:
        fake = env.start_fake(procs, latency_ms=0)
        bare = measure_chain(db, broker, procs.workdir, n=n, concurrency=concurrency, console=console, peer=False,
                             profile=profile)
        console.print(f"  bare Celery: {bare.rate:.1f} jobs/s ({bare.seconds:.1f} s); CPU ms per job: "
                      f"{_cpu_line(bare)}")
        env.broker_url()  # empty the broker between each
        peer = measure_chain(db, broker, procs.workdir, n=n, concurrency=concurrency, console=console, peer=True,
                             fake=fake, profile=profile)
        peer_note = "" if peer.ok == peer.jobs else f"peer: only {peer.ok}/{peer.jobs} succeeded"
        console.print(f"  peer chain: {peer.rate:.1f} jobs/s ({peer.seconds:.1f} s) {peer_note}; CPU ms per job: "
                      f"{_cpu_line(peer)}")
        env.broker_url()
        sy = measure_switchyard(db, broker, fake, procs.workdir, n=n, concurrency=concurrency, console=console,
                                profile=profile)
        note = "" if sy.ok == sy.jobs else f"only {sy.ok}/{sy.jobs} succeeded"
        console.print(f"  switchyard: {sy.rate:.1f} jobs/s ({sy.seconds:.1f} s) {note}; CPU ms per job: "
                      f"{_cpu_line(sy)}")
        alone = measure_stages(db, fake.url, procs.workdir, n=min(n, 150 if quick else 1000))
    console.print("  the stages as plain functions, no broker (CPU ms per job): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in alone.items()))
    extra = {"jobs": n, "concurrency": concurrency, "switchyard_s": sy.seconds, "peer_s": peer.seconds,
             "bare_s": bare.seconds, "succeeded": sy.ok, "peer_succeeded": peer.ok, "cpu_s_switchyard": sy.cpu,
             "cpu_s_peer": peer.cpu, "cpu_s_bare": bare.cpu, "stages_alone_cpu_ms_per_job": alone}
    return [Figure(NAME, f"jobs/s, {n:,} jobs enqueue→terminal, vs the hand-written chain", sy.rate, "jobs/s",
                   baseline=peer.rate, baseline_name="peer chain", target=1.0,
                   note="; ".join(x for x in (note, peer_note) if x), extra=extra),
            # The diagnostic: what Celery alone costs for three hops with no model call.
            Figure(NAME, f"jobs/s, {n:,} jobs, vs bare Celery (no model calls; diagnostic)", sy.rate, "jobs/s",
                   baseline=bare.rate, baseline_name="bare Celery", note=note)]
