"""Figure 2 of priorities and fairness: a small batch beside a large one of another tenant.

Tenant A's large batch (20,000 jobs; 1,000 with --quick) runs on a pipeline it saturates: the fake
Claude answers after ``latency_ms``, so the work tier's ``threads`` are all busy and the dispatcher
holds ``max_in_flight`` jobs in a stage. Then tenant B enqueues 100 jobs, and the time from its
enqueue to its last job's end is measured:

- at the same priority as A (5): fairness alone, against B's time on the idle pipeline (target: at
  most 2x; with one other tenant, B's fair share is half the pipeline);
- at priority 9: admitted first, and its messages popped first (target: at most 1.2x).

The idle baseline is measured in the same run, on the same processes, before A is enqueued. The
jobs are pinned to one work tier (one model call each, then a deterministic validation), so the
work tier's threads are the one resource shared. Also recorded: how many of the fake's calls were
in flight when B was enqueued (saturation), and B's largest share of the jobs in flight.

Then, with the workers stopped and A's backlog still queued, the cost of one admission round (1,000
places over A's backlog and a few other batches) against the plain ``ORDER BY id LIMIT`` read the
dispatcher made before, and whether its plan reads ``jobs`` by index only.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench import env
from bench.jobs import classify_jobs, write_jsonl
from bench.report import Figure
from pipeline import tenants
from pipeline.db import make_engine, session_factory, transaction
from pipeline.flow.admission import admit
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import ACTIVE, Batch, Job
from pipeline.queries.report import terminal_count
from pipeline.settings import Settings

NAME = "fairness"
TIER = "sonnet"


@dataclass
class Run:
    seconds: float
    saturation: float  # the fake's calls in flight when B was enqueued, over the tier's threads
    a_in_flight: int  # A's jobs in a stage when B was enqueued
    b_peak_share: float  # B's largest share of the jobs in flight while it ran


def run(*, quick: bool, console: Console, profile: bool = False, big: int | None = None, small: int | None = None,
        threads: int = 8, latency_ms: float | None = None, max_in_flight: int | None = None) -> list[Figure]:
    big = big or (1_000 if quick else 20_000)
    small = small or (40 if quick else 100)
    # Long calls, so that the tier's threads waiting on the fake are the bottleneck rather than the
    # CPU of a small shared machine: A keeps every thread's call in flight.
    latency_ms = latency_ms or (1000.0 if quick else 1500.0)
    # Twice the threads: a queue's worth waiting for every busy thread, so a freed thread never
    # waits for the dispatcher, and the broker's queue is short enough that fairness at admission
    # is fairness at the threads (README, Priorities and fairness).
    max_in_flight = max_in_flight or 2 * threads
    broker = env.broker_url()
    figures: list[Figure] = []
    with env.scratch_database("sy_bench_fair") as db, env.workdir() as workdir:
        sessions = session_factory(make_engine(db, pool_size=2))
        settings = Settings(DATABASE_URL=db, BROKER_URL=broker)
        with transaction(sessions) as s:
            a_id = tenants.get_or_create(s, "tenant-a").id
            b_id = tenants.get_or_create(s, "tenant-b").id
        extra = {"SWITCHYARD_MAX_IN_FLIGHT": str(max_in_flight)}
        with env.Processes(env.switchyard_env(database_url=db, broker=broker, claude_url="", **extra),
                           workdir=workdir) as procs:
            fake = env.start_fake(procs, latency_ms=latency_ms)
            e = {"ANTHROPIC_BASE_URL": fake.url}
            env.start_together(procs, {TIER: threads, "validate": threads}, env=e)
            console.print(f"[bold]{NAME}[/]: {threads} {TIER} threads, {latency_ms:.0f} ms a call, at most "
                          f"{max_in_flight} jobs in flight; A {big:,} jobs, B {small} jobs")

            def enqueue(name: str, n: int, tenant_id: int, priority: int | None = None) -> int:
                path = write_jsonl(workdir / f"{name}.jsonl", classify_jobs(n, tier=TIER, prefix=name))
                report = enqueue_file(sessions, path, batch=name, config=settings.models, tenant_id=tenant_id,
                                      priority=priority)
                assert report.batch_id is not None and report.accepted == n
                return report.batch_id

            # A warm-up wave, so that pools and connections exist before anything is timed.
            _finish(sessions, enqueue("warm", threads, b_id), procs, timeout=120)
            idle = _measure(sessions, lambda: enqueue("b-idle", small, b_id), procs, fake, threads)
            console.print(f"  B on the idle pipeline: {idle.seconds:.2f} s")
            a_batch = enqueue("a-backlog", big, a_id)
            env.wait_until(lambda: _in_flight(sessions, a_batch) >= max_in_flight, timeout=120, procs=procs,
                           what="A's batch filling the pipeline")
            time.sleep(2 * latency_ms / 1000)  # a full wave of A's calls at the fake
            same = _measure(sessions, lambda: enqueue("b-same", small, b_id), procs, fake, threads)
            console.print(f"  B beside A, same priority: {same.seconds:.2f} s ({same.seconds / idle.seconds:.2f}x); "
                          f"the fake had {100 * same.saturation:.0f}% of the threads' calls in flight, A "
                          f"{same.a_in_flight} jobs in a stage; B held up to {100 * same.b_peak_share:.0f}% of them")
            high = _measure(sessions, lambda: enqueue("b-high", small, b_id, priority=9), procs, fake, threads)
            console.print(f"  B beside A, priority 9: {high.seconds:.2f} s ({high.seconds / idle.seconds:.2f}x); "
                          f"saturation {100 * high.saturation:.0f}%, B held up to {100 * high.b_peak_share:.0f}%")
            with sessions() as s:
                done_a = terminal_count(s, batch_id=a_batch)[0]
            if done_a >= big:
                raise RuntimeError(f"A's batch finished ({done_a:,} jobs) before B's runs did: make it larger")
        # The workers are gone; A's backlog is still queued. One admission round, timed.
        cost = _admission_cost(sessions, b_id, runs=5 if quick else 20)
        console.print(f"  one admission round of 1,000 over {cost['queued']:,} queued jobs in {cost['batches']} "
                      f"batches: {cost['admit_ms']:.1f} ms (the old oldest-first read: {cost['plain_ms']:.1f} ms); "
                      f"jobs read by index only: {cost['indexed']}")
    common: dict[str, Any] = {"threads": threads, "latency_ms": latency_ms, "max_in_flight": max_in_flight,
                              "big": big, "small": small, "idle_s": idle.seconds}
    figures += [
        Figure(NAME, f"B ({small} jobs) beside A ({big:,}), same priority: time to finish vs idle", same.seconds, "s",
               baseline=idle.seconds, baseline_name="B on the idle pipeline", target=2.0, target_kind="ratio<=",
               extra={**common, "saturation": same.saturation, "a_in_flight": same.a_in_flight,
                      "b_peak_share": same.b_peak_share}),
        Figure(NAME, f"B ({small} jobs) beside A ({big:,}), B at priority 9: time to finish vs idle", high.seconds,
               "s", baseline=idle.seconds, baseline_name="B on the idle pipeline", target=1.2, target_kind="ratio<=",
               extra={**common, "saturation": high.saturation, "a_in_flight": high.a_in_flight,
                      "b_peak_share": high.b_peak_share}),
        Figure(NAME, f"one admission round (1,000 places, {cost['queued']:,} queued in {cost['batches']} batches)",
               cost["admit_ms"], "ms", baseline=cost["plain_ms"], baseline_name="the oldest-first read",
               note="" if cost["indexed"] else f"seq scan: {cost['plan']}", extra=cost),
    ]
    return figures


def _in_flight(sessions: sessionmaker[Session], batch_id: int | None = None) -> int:
    with sessions() as s:
        q = select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE))
        if batch_id is not None:
            q = q.where(Job.batch_id == batch_id)
        return s.scalar(q) or 0


def _finish(sessions: sessionmaker[Session], batch_id: int, procs: env.Processes, *, timeout: float) -> None:
    def done() -> bool:
        with sessions() as s:
            n, total = terminal_count(s, batch_id=batch_id)
        return bool(total) and n == total

    env.wait_until(done, timeout=timeout, interval=0.05, procs=procs, what=f"batch {batch_id}")


def _measure(sessions: sessionmaker[Session], start: Any, procs: env.Processes, fake: env.Fake,
             threads: int) -> Run:
    """Enqueue B (``start()``), follow it to its end: seconds from the enqueue's start to its last
    job's end (its ``finished_at``), with what the pipeline held when it began."""
    calls = int(fake.stats()["in_flight"])
    others = _in_flight(sessions)
    t0 = time.time()
    batch_id = start()
    peak = 0.0
    deadline = time.monotonic() + 600
    while True:
        with sessions() as s:
            n, total = terminal_count(s, batch_id=batch_id)
            # Both counts in one statement, so from one snapshot.
            mine, every = s.execute(select(func.count().filter(Job.batch_id == batch_id), func.count())
                                    .select_from(Job).where(Job.status.in_(ACTIVE))).one()
        if every:
            peak = max(peak, mine / every)
        if total and n == total:
            break
        procs.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} not finished after 600 s")
        time.sleep(0.05)
    with sessions() as s:
        end = s.scalar(select(func.max(Job.finished_at)).where(Job.batch_id == batch_id))
    assert end is not None
    return Run(end.timestamp() - t0, calls / threads, others, peak)


def _admission_cost(sessions: sessionmaker[Session], tenant_id: int, *, runs: int) -> dict[str, Any]:
    """Time ``admit`` for 1,000 places (in a transaction rolled back each time) beside the read the
    dispatcher made before it, with a few more batches queued beside the backlog."""
    engine = sessions.kw["bind"]
    with transaction(sessions) as s:
        for i in range(5):
            s.add(Batch(name=f"extra-{i}", tenant_id=tenant_id, priority=3 + i))
        s.flush()
        ids = list(s.scalars(select(Batch.id).where(Batch.name.like("extra-%"))))
        s.execute(text("INSERT INTO jobs (batch_id, key, kind, payload, status) SELECT b, 'k' || g, 'generate', "
                       "'{\"prompt\": \"x\"}', 'queued' FROM unnest(CAST(:ids AS bigint[])) b, "
                       "generate_series(1, 200) g"),
                  {"ids": ids})
    with engine.connect() as conn:
        conn.execute(text("ANALYZE jobs"))
        conn.commit()
    plain = text("SELECT id, pinned_tier FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1000 "
                 "FOR UPDATE SKIP LOCKED")

    def timed(fn: Any) -> float:
        out = []
        for _ in range(runs):
            with engine.connect() as conn:
                t0 = time.perf_counter()
                fn(conn)
                out.append((time.perf_counter() - t0) * 1000)
                conn.rollback()
        return statistics.median(out)

    admit_ms = timed(lambda c: admit(c, max_in_flight=10**6, limit=1000))
    plain_ms = timed(lambda c: c.execute(plain).all())
    # The plans of what admit sends, captured and explained.
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as conn:
            admit(conn, max_in_flight=10**6, limit=1000)
            conn.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    scans: list[str] = []
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        for statement, parameters in captured:
            with raw.cursor() as cur:
                cur.execute("EXPLAIN " + statement, parameters)
                plan = "\n".join(r[0] for r in cur.fetchall())
            if "Seq Scan on jobs" in plan:
                scans.append(" ".join(statement.split()[:8]))
        conn.rollback()
    with sessions() as s:
        queued = s.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0
        batches = s.scalar(select(func.count(func.distinct(Job.batch_id))).where(Job.status == "queued")) or 0
    return {"admit_ms": admit_ms, "plain_ms": plain_ms, "queued": queued, "batches": batches,
            "indexed": not scans, "plan": "; ".join(scans), "statements": len(captured), "runs": runs}
