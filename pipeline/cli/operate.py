"""Running switchyard: the schema, the worker and dispatcher processes, `status`, the fake Claude
and the demo."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.common import app, console, db_app, err, print_summary, settings
from pipeline.errors import InvalidInput
from pipeline.settings import Settings

# -- schema ----------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply the migrations up to REVISION (default: head)."""
    from pipeline import migrate

    s = settings()
    migrate.upgrade(s.database_url, revision=revision)
    console.print(f"database at revision {migrate.current(s.database_url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's current revision."""
    from pipeline import migrate

    console.print(migrate.current(settings().database_url) or "(empty database)")


@db_app.command("rebuild-rollups")
def db_rebuild_rollups(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")] = False,
) -> None:
    """Empty the rollups that `stats` and `batches` read and fold every job and call into them
    again, from the raw records (pipeline/queries/rollups.py). Safe while the pipeline runs."""
    import time

    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from pipeline.db import make_engine, session_factory
    from pipeline.queries import rollups

    engine = make_engine(settings().database_url, pool_size=1)
    started = time.monotonic()
    try:
        with session_factory(engine)() as session, Progress(
                TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                disable=as_json or not err.is_terminal) as bar:
            task = bar.add_task("emptying the rollups", total=None)
            done = rollups.rebuild(session, progress=lambda jobs, calls: bar.update(
                task, description=f"folded {jobs:,} jobs and {calls:,} calls"))
    finally:
        engine.dispose()
    elapsed = time.monotonic() - started
    if as_json:
        print(json.dumps({"jobs": done.jobs, "calls": done.calls, "seconds": round(elapsed, 3)}))
    else:
        console.print(f"rollups rebuilt: {done.jobs:,} jobs and {done.calls:,} calls folded in {elapsed:.1f} s")


# -- processes ---------------------------------------------------------------------------------------


class Pool(StrEnum):
    threads = "threads"
    prefork = "prefork"
    solo = "solo"


# Threads per worker unless --concurrency says otherwise. Triage and format checks are short
# Haiku calls; a work call (Haiku's too, when the policy gives it work) can run to
# work_max_tokens, so a work queue keeps more of them in flight.
STAGE_CONCURRENCY = {"triage": 32, "validate": 32}
WORK_CONCURRENCY = 64


def default_concurrency(queue: str) -> int:
    return STAGE_CONCURRENCY.get(queue, WORK_CONCURRENCY)


def _unknown_queue(tier: str, s: Settings) -> InvalidInput:
    models = s.models
    queues = ", ".join(models.queues)
    if tier in models.tiers:
        # The likeliest case: `--tier haiku` under a policy that only triages with Haiku.
        return InvalidInput(f"tier {tier!r} has no work queue under {models.source}: its [routing] sends no job "
                            f"there (the queues are {queues}); point SWITCHYARD_CONFIG at a policy that does, "
                            f"such as pipeline/samples/cascade.toml")
    return InvalidInput(f"unknown tier {tier!r}: expected one of {queues}")


@app.command()
def worker(
    tier: Annotated[str, typer.Option(help="Queue to serve: triage, validate, or a work tier the routing policy "
                                           "sends jobs to (sonnet, opus; haiku under a cascade policy).")],
    concurrency: Annotated[int | None, typer.Option(
        min=1, help=f"Calls in flight (threads); default {STAGE_CONCURRENCY['triage']} for triage and validate, "
                    f"{WORK_CONCURRENCY} for a work tier.")] = None,
    pool: Annotated[Pool, typer.Option(help="Celery pool. Threads keep many slow calls in flight.")] = Pool.threads,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    metrics_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Serve Prometheus metrics on this port (default: SWITCHYARD_METRICS_PORT, else none).")]
    = None,
    events: Annotated[bool | None, typer.Option(
        "--events/--no-events",
        help="Send task events, for Flower or `celery events` (default: SWITCHYARD_TASK_EVENTS, else off).")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Processes to share the threads among, under one parent that forwards signals (default: "
                    "one per 200 threads of --concurrency).")] = None,
    db_connections: Annotated[int | None, typer.Option(
        min=1, help="Postgres connections the worker may open, all its processes together (default: "
                    "SWITCHYARD_DB_CONNECTIONS, else C/2, between 8 and 32).")] = None,
) -> None:
    """Run a worker for one tier's queue."""
    s = settings()
    from workers.config import queue_names

    if tier not in queue_names(s):
        raise _unknown_queue(tier, s)
    s.tier_limits()  # a mistake in SWITCHYARD_RATE_LIMITS stops the worker now, not at its first job
    from pipeline.claude.ratelimit import OutputReserve

    OutputReserve(s.rate_output_reserve)  # ...and one in SWITCHYARD_RATE_OUTPUT_RESERVE
    # ...and so does a Claude endpoint that cannot be reached, refuses the key or lacks the model
    # this queue calls: its jobs would otherwise wait out their patience before failing.
    from pipeline.cli import workergroup
    from pipeline.flow.runtime import check_claude

    if workergroup.child_index() is None:  # a worker group's parent has checked for its children
        check_claude(s, tiers=[s.models.queue_tier(tier)])
    # Model calls are I/O-bound and take seconds: 64 threads wait on them for the cost of one
    # process, where a prefork pool of 2 would hold 2 calls.
    n = concurrency or default_concurrency(tier)
    conns = workergroup.db_connections(n, db_connections, s.worker_db_connections)
    split = workergroup.processes_for(n, processes) if pool is Pool.threads else 1
    if split > 1:
        _run_worker_group(tier, n, split, conns, pool=pool, loglevel=loglevel, events=events,
                          metrics_port=metrics_port if metrics_port is not None else s.metrics_port)
        return
    import workers.celery

    celery_app = workers.celery.app
    celery_app.conf.worker_concurrency = n
    celery_app.conf.switchyard_db_connections = conns
    if events is not None:
        celery_app.conf.worker_send_task_events = events
    port = metrics_port if metrics_port is not None else s.metrics_port
    heartbeat = _start_worker_side(s, celery_app, tier=tier, concurrency=n, pool=pool.value, metrics_port=port)
    err.print(f"worker {tier}: {s.connects_to(claude=True)}", markup=False, highlight=False, soft_wrap=True)
    if heartbeat is not None:
        # Claims name this process, so the dispatcher republishes them as soon as its beats stop.
        celery_app.conf.switchyard_worker_id = heartbeat.worker_id
    index = workergroup.child_index()
    node = f"{tier}@%h" if index is None else f"{tier}-{index}@%h"
    workergroup.report_ready_when_celery_is()
    try:
        celery_app.worker_main(["worker", "-Q", tier, "-P", pool.value, "-c", str(n), "-n", node,
                                "-l", loglevel, "--without-mingle", "--without-gossip"])
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _run_worker_group(tier: str, n: int, processes: int, conns: int, *, pool: Pool, loglevel: str,
                      events: bool | None, metrics_port: int | None) -> None:
    """Past a few hundred threads, the worker is a parent of several worker processes
    (pipeline/cli/workergroup.py says why and how signals reach them)."""
    import sys

    from pipeline.cli import workergroup

    argv = [sys.executable, "-c", "from pipeline.cli.app import main; main()", "worker", "--tier", tier,
            "--pool", pool.value, "--loglevel", loglevel]
    if events is not None:
        argv.append("--events" if events else "--no-events")
    children = workergroup.plan(n, processes, conns, metrics_port)
    err.print(f"worker {tier}: {n} threads as {processes} processes of "
              f"{'+'.join(str(c.concurrency) for c in children)}, {conns} Postgres connections in all",
              markup=False, highlight=False)
    status = workergroup.run_group(argv, children, tier=tier,
                                   say=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))
    if status:
        raise typer.Exit(status)


def _start_worker_side(s: Settings, celery_app: Any, *, tier: str, concurrency: int, pool: str,
                       metrics_port: int | None) -> Any:
    """Metrics (if asked for) and the heartbeat (on Redis) that `switchyard status` and the
    dispatcher's sweeper read."""
    from pipeline import metrics

    tick = None
    if metrics_port:
        metrics.serve(metrics_port)
        celery_app.conf.switchyard_hooks = {"on_attempt": metrics.attempt_observer(s.models),
                                            "on_wait": metrics.observe_wait}
        err.print(f"metrics on :{metrics_port}/metrics")
    if not s.uses_redis:
        return None
    import redis

    from pipeline.queries.ops import Heartbeat, queue_depths
    from workers.base import busy

    client = redis.Redis.from_url(s.broker_url, socket_timeout=5, socket_connect_timeout=5)
    if metrics_port:
        def tick() -> None:
            metrics.set_depths(queue_depths(client, [tier]))
    return Heartbeat(client, tier=tier, concurrency=concurrency, pool=pool, busy=busy,
                     metrics_port=metrics_port, tick=tick).start()


@app.command()
def dispatcher(
    interval: Annotated[float | None, typer.Option(min=0.01, max=3600, help="Seconds between rounds.")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Serve Prometheus metrics (queue depths) on this port (default: "
                               "SWITCHYARD_METRICS_PORT).")] = None,
) -> None:
    """Feed queued jobs to the stages as capacity frees up, and republish stalled ones."""
    import logging
    import signal
    import threading

    from pipeline.flow.dispatch import run_dispatcher
    from pipeline.flow.runtime import build_pipeline
    from workers.base import broker_watch, publisher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = settings()
    import workers.celery

    p = build_pipeline(s, concurrency=4)
    stop = threading.Event()
    port = metrics_port if metrics_port is not None else s.metrics_port
    if port and s.uses_redis:
        _serve_depths(s, port, stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    lapsed = None
    if s.uses_redis:
        import redis

        from pipeline.queries.ops import LapsedWorkers

        lapsed = LapsedWorkers(redis.Redis.from_url(s.broker_url, socket_timeout=5, socket_connect_timeout=5))
    logging.getLogger("switchyard.dispatcher").info(
        "dispatcher: %s; max %d jobs in flight, stage deadline %.0f s, claim deadline %.0f s%s", s.connects_to(),
        s.max_in_flight, s.effective_stage_deadline_s, s.effective_claim_deadline_s,
        " (sooner when a worker stops beating)" if lapsed else "")
    from pipeline.flow.economy import build_economy

    economy = build_economy(p, s)
    run_dispatcher(p, publisher(workers.celery.app), max_in_flight=s.max_in_flight,
                   interval_s=interval or s.dispatch_interval_s, deadline_s=s.effective_stage_deadline_s,
                   claim_deadline_s=s.effective_claim_deadline_s, broker_lost=broker_watch(s.broker_url),
                   lapsed=lapsed, stop=stop, rollup_interval_s=s.rollup_interval_s, economy=economy.tick)


def _serve_depths(s: Settings, port: int, stop: Any) -> None:
    """Export every queue's depth, refreshed every few seconds: what an autoscaler reads."""
    import contextlib
    import threading

    import redis

    from pipeline import metrics
    from pipeline.queries.ops import queue_depths
    from workers.config import queue_names

    metrics.serve(port)
    client = redis.Redis.from_url(s.broker_url, socket_timeout=5, socket_connect_timeout=5)
    queues = queue_names(s)

    def refresh() -> None:
        while not stop.is_set():
            # A lost broker is the dispatcher's own loop to report; the gauge just waits for it.
            with contextlib.suppress(redis.RedisError):
                metrics.set_depths(queue_depths(client, queues))
            stop.wait(5.0)

    threading.Thread(target=refresh, name="switchyard-depths", daemon=True).start()
    err.print(f"metrics on :{port}/metrics")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one snapshot as JSON.")] = False,
    watch: Annotated[bool, typer.Option(help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, max=3600, help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Queues, jobs in flight, workers online and recent throughput, per tier."""
    import time

    from pipeline.cli.status import StatusSource, render_status

    source = StatusSource(settings())
    if as_json:
        print(json.dumps(source.snapshot().as_dict(), default=str))
        return
    if not watch:
        console.print(render_status(source.snapshot()))
        return
    from rich.live import Live

    with Live(render_status(source.snapshot()), console=console, screen=False, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render_status(source.snapshot()), refresh=True)
        except KeyboardInterrupt:
            pass


@app.command("fake-claude")
def fake_claude(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8765,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(min=0, max=3_600_000, help="Delay before each answer.")] = 0,
    latency_jitter_ms: Annotated[float, typer.Option(min=0, max=3_600_000, help="Extra uniform random delay.")] = 0,
    fault_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of requests that get a fault.")] = 0.0,
    faults: Annotated[str, typer.Option(help="Faults to draw from: 429,529,500,stall,drop,malformed,empty,refusal.")]
    = "429,529,500,stall,drop,malformed,empty,refusal",
    stall_seconds: Annotated[float, typer.Option(min=0, max=3600, help="How long a 'stall' fault waits.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed for the fault draw and for which jobs get wrong answers.")] = 0,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute per model class, then 429.")] = None,
    error_rates: Annotated[str | None, typer.Option(
        help="Turn the quality model on: wrong classify/extract answers per model class and true difficulty. "
             "'default', CLASS.DIFFICULTY=RATE items (haiku.hard=0.35,sonnet.*=0.1) or a TOML or JSON file.")] = None,
    triage_noise: Annotated[float, typer.Option(min=0, max=1, help="Share of triage verdicts that name "
                                                                   "another difficulty than the true one.")] = 0.0,
) -> None:
    """Serve a fake Claude Messages API for tests, demos and benchmarks."""
    from pipeline.fake_claude import FakeOptions, parse_error_rates, parse_faults, serve_forever

    try:
        fault_list = parse_faults(faults)
    except ValueError as exc:
        raise InvalidInput(f"--faults: {exc}") from None
    try:
        rates = parse_error_rates(error_rates) if error_rates is not None else None
    except ValueError as exc:
        raise InvalidInput(f"--error-rates: {exc}") from None
    serve_forever(host=host, port=port, options=FakeOptions(
        latency_ms=latency_ms, latency_jitter_ms=latency_jitter_ms, fault_rate=fault_rate, faults=fault_list,
        seed=seed, stall_seconds=stall_seconds, rpm=rpm, error_rates=rates, triage_noise=triage_noise))


# -- work ----------------------------------------------------------------------------------------------


# enqueue, cancel, jobs list|show, batches, stats and export live in pipeline/cli/history.py.


@app.command()
def demo(
    jobs: Annotated[Path | None, typer.Option(help="Jobs file (default: the bundled sample).")] = None,
    shadow_rate: Annotated[float | None, typer.Option(
        help="Share of the jobs that succeed below the reference tier worked again by it, to estimate "
             "agreement (0 turns it off); default 0.5.")] = None,
    mode: Annotated[str, typer.Option(
        help="standard, or economy: every call through the fake's Message Batches API at half price "
             "(message batches submitted after [economy] max_age_s).")] = "standard",
) -> None:
    """Run the whole pipeline on sample jobs: SQLite, in-process broker, fake Claude by default.
    Without --jobs, a second batch runs the example task (pipeline/samples/ticket-topic.toml).
    Each summary ends with the saving and the estimated agreement with the reference tier."""
    from pipeline.cli.demo import DEMO_SHADOW_RATE, quality_line, run_demo
    from pipeline.cli.tables import economy_line

    shadow_rate = DEMO_SHADOW_RATE if shadow_rate is None else shadow_rate
    if not 0 <= shadow_rate <= 1:
        raise InvalidInput(f"--shadow-rate must be a number from 0 to 1 (the share of jobs shadowed), "
                           f"not {shadow_rate}")
    if mode not in ("standard", "economy"):
        raise InvalidInput(f"--mode must be standard or economy, not {mode!r}")
    for batch in run_demo(settings(), console=console, jobs_file=jobs, shadow_rate=shadow_rate, mode=mode):
        console.rule(f"batch {batch.name}")
        print_summary(batch.summary)
        if line := economy_line(batch.economy):
            console.print(line)
        console.print(quality_line(batch), markup=False, highlight=False)
