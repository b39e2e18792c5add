"""The `switchyard` command. Each command reads Settings once and calls the domain library.

A user's mistake (a bad file, a bad flag, an unreachable database) prints one sentence and exits
2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from pipeline.cli.tables import compact, cost_line, new_table
from pipeline.errors import ConfigError, SwitchyardError
from pipeline.names import escaped
from pipeline.settings import Settings, mask_url

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Route bulk Claude work between Haiku, Sonnet and Opus.")
db_app = typer.Typer(no_args_is_help=True, help="The database schema (Alembic migrations).")
jobs_app = typer.Typer(no_args_is_help=True, help="Job history.")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
# The HTTP API and its tokens live in their own module (pipeline/cli/tenants.py).
from pipeline.cli.tenants import serve, tenants_app, tokens_app  # noqa: E402

app.add_typer(tokens_app, name="tokens")
app.add_typer(tenants_app, name="tenants")
app.command()(serve)

console = Console()
# Errors are one sentence on one line, however narrow the terminal: scripts grep them.
err = Console(stderr=True)


def settings() -> Settings:
    return Settings()


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


# -- processes ---------------------------------------------------------------------------------------


class Pool(StrEnum):
    threads = "threads"
    prefork = "prefork"
    solo = "solo"


DEFAULT_CONCURRENCY = {"triage": 32, "validate": 32}


@app.command()
def worker(
    tier: Annotated[str, typer.Option(help="Queue to serve: triage, validate, or a work tier (sonnet, opus).")],
    concurrency: Annotated[int | None, typer.Option(min=1, help="Calls in flight (threads).")] = None,
    pool: Annotated[Pool, typer.Option(help="Celery pool. Threads keep many slow calls in flight.")] = Pool.threads,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    metrics_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Serve Prometheus metrics on this port (default: SWITCHYARD_METRICS_PORT, else none).")]
    = None,
    events: Annotated[bool | None, typer.Option(
        "--events/--no-events",
        help="Send task events, for Flower or `celery events` (default: SWITCHYARD_TASK_EVENTS, else off).")] = None,
) -> None:
    """Run a worker for one tier's queue."""
    s = settings()
    from workers.config import queue_names

    queues = queue_names(s)
    if tier not in queues:
        raise ConfigError(f"unknown tier {tier!r}: expected one of {', '.join(queues)}")
    s.tier_limits()  # a mistake in SWITCHYARD_RATE_LIMITS stops the worker now, not at its first job
    # ...and so does a Claude endpoint that cannot be reached, refuses the key or lacks the model
    # this queue calls: its jobs would otherwise wait out their patience before failing.
    from pipeline.flow.runtime import check_claude

    models = s.models
    called = {"triage": models.triage_tier, "validate": models.format_check_tier}.get(tier, tier)
    check_claude(s, tiers=[called])
    # Model calls are I/O-bound and take seconds: 64 threads wait on them for the cost of one
    # process, where a prefork pool of 2 would hold 2 calls.
    n = concurrency or DEFAULT_CONCURRENCY.get(tier, 64)
    import workers.celery

    celery_app = workers.celery.app
    celery_app.conf.worker_concurrency = n
    if events is not None:
        celery_app.conf.worker_send_task_events = events
    port = metrics_port if metrics_port is not None else s.metrics_port
    heartbeat = _start_worker_side(s, celery_app, tier=tier, concurrency=n, pool=pool.value, metrics_port=port)
    err.print(f"worker {tier}: {s.connects_to(claude=True)}", markup=False, highlight=False, soft_wrap=True)
    if heartbeat is not None:
        # Claims name this process, so the dispatcher republishes them as soon as its beats stop.
        celery_app.conf.switchyard_worker_id = heartbeat.worker_id
    try:
        celery_app.worker_main(["worker", "-Q", tier, "-P", pool.value, "-c", str(n), "-n", f"{tier}@%h",
                                "-l", loglevel, "--without-mingle", "--without-gossip"])
    finally:
        if heartbeat is not None:
            heartbeat.stop()


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
    run_dispatcher(p, publisher(workers.celery.app), max_in_flight=s.max_in_flight,
                   interval_s=interval or s.dispatch_interval_s, deadline_s=s.effective_stage_deadline_s,
                   claim_deadline_s=s.effective_claim_deadline_s, broker_lost=broker_watch(s.broker_url),
                   lapsed=lapsed, stop=stop)


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
    seed: Annotated[int, typer.Option(help="Seed for the fault draw.")] = 0,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute per model class, then 429.")] = None,
) -> None:
    """Serve a fake Claude Messages API for tests, demos and benchmarks."""
    from pipeline.fake_claude import FakeOptions, parse_faults, serve_forever

    try:
        fault_list = parse_faults(faults)
    except ValueError as exc:
        raise ConfigError(f"--faults: {exc}") from None
    serve_forever(host=host, port=port, options=FakeOptions(
        latency_ms=latency_ms, latency_jitter_ms=latency_jitter_ms, fault_rate=fault_rate, faults=fault_list,
        seed=seed, stall_seconds=stall_seconds, rpm=rpm))


# -- work ----------------------------------------------------------------------------------------------


# enqueue, cancel, jobs list|show, batches, stats and export live in pipeline/cli/history.py.


@app.command()
def demo(
    jobs: Annotated[Path | None, typer.Option(help="Jobs file (default: the bundled sample).")] = None,
) -> None:
    """Run the whole pipeline on sample jobs: SQLite, in-process broker, fake Claude by default."""
    from pipeline.cli.demo import run_demo

    summary = run_demo(settings(), console=console, jobs_file=jobs)
    print_summary(summary)


def print_summary(summary: Any) -> None:
    figures = ("jobs ended here", "calls", "input tokens", "output tokens", "cost")
    table = new_table(("tier", *figures), figures=figures, title="Routing summary")
    for t in summary.tiers:
        table.add_row(t.tier, compact(t.jobs), compact(t.calls), compact(t.input_tokens), compact(t.output_tokens),
                      compact(t.cost_usd, "usd"))
    table.add_row(Text("total", "bold"), compact(summary.jobs), compact(sum(t.calls for t in summary.tiers)),
                  compact(sum(t.input_tokens for t in summary.tiers)),
                  compact(sum(t.output_tokens for t in summary.tiers)), Text(compact(summary.cost_usd, "usd"), "bold"))
    console.print(table)
    statuses = ", ".join(f"{k} {compact(v)}" for k, v in sorted(summary.by_status.items()))
    console.print(f"jobs: {compact(summary.jobs)} ({statuses})")
    console.print(f"escalations: {compact(summary.escalations)}   "
                  f"validation failures: {compact(summary.validation_failures)}")
    console.print(cost_line(summary))
    if summary.failure_reasons:
        console.print(failure_view(summary.failure_reasons, failed=summary.by_status.get("failed", 0)))


def failure_view(reasons: Any, *, failed: int) -> Text:
    """The most common failure reasons with their counts (report.failure_reasons), for every
    summary: `demo`, `enqueue --wait` and `stats`. Text, not markup: a reason may hold brackets."""
    lines = [Text("failed, the most common reasons first:")]
    lines += [Text(f"  {compact(r.jobs):>7}  {escaped(r.reason)}") for r in reasons]
    rest = failed - sum(r.jobs for r in reasons)
    if rest > 0:
        lines.append(Text(f"  {compact(rest):>7}  for other reasons (`switchyard jobs list --status failed`)"))
    return Text("\n").join(lines)



# -- entry point ---------------------------------------------------------------------------------------

import pipeline.cli.history  # noqa: E402, F401  (registers the batch and history commands on `app`)


def _error(message: str) -> None:
    # Text, not markup: a message may quote the user's own brackets ("[tiers.opus]", a job's text).
    # Masked: a driver's message may quote DATABASE_URL or BROKER_URL, password and all.
    err.print(Text.assemble(("error: ", "red"), mask_url(message)), highlight=False, soft_wrap=True)


def _missing_table(exc: Exception) -> str | None:
    """The driver's words for a table that does not exist (a database never migrated), else None.
    Postgres says it with SQLSTATE 42P01, SQLite with "no such table"."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig):
        return str(orig).strip().splitlines()[0]
    return None


def main() -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from psycopg import OperationalError as DriverError
    from sqlalchemy.exc import OperationalError as DatabaseError
    from sqlalchemy.exc import ProgrammingError

    from pipeline.db import is_conflict

    try:
        app()
    except SwitchyardError as exc:
        _error(str(exc))
        sys.exit(2)
    except (DatabaseError, ProgrammingError, DriverError) as exc:
        # DriverError: the driver's own, unwrapped, from the COPYs that enqueue runs on its connection.
        missing = _missing_table(exc)
        if missing is None and isinstance(exc, ProgrammingError):
            raise  # a statement of ours is wrong: a bug, and its traceback is what to report
        orig = exc.orig if isinstance(exc, DatabaseError | ProgrammingError) else exc
        first = str(orig).strip().splitlines()[0] if orig else str(exc)
        if is_conflict(exc):
            # Not the database's address or health: it picked this command's transaction to abort.
            _error(f"the database aborted this command because it conflicted with concurrent work "
                   f"({type(orig).__name__}); run it again")
        elif missing is not None:
            _error(f"the database at DATABASE_URL has no switchyard tables yet ({missing}): "
                   f"run 'switchyard db upgrade' first")
        else:
            _error(f"cannot use the database (DATABASE_URL): {first}")
        sys.exit(2)
    except BrokerError as exc:
        _error(f"cannot reach the broker (BROKER_URL): {exc}")
        sys.exit(2)
    except UnicodeEncodeError as exc:
        # A byte that is not UTF-8 in an argument reaches Python as a lone surrogate
        # (surrogateescape), which no text sent to Postgres can hold. Refused where it is used as
        # text, not at the start: a file name may hold one and still be opened.
        arg = next((a for a in sys.argv[1:] if _SURROGATE.search(a)), None)
        if exc.reason != "surrogates not allowed" or arg is None:
            raise
        from pipeline.names import quoted

        _error(f"{quoted(arg)} is not valid UTF-8: an argument holds a byte that is not UTF-8")
        sys.exit(2)
    except OSError as exc:
        # A write that failed with no file named is standard output's: every file the commands
        # write themselves is written by pipeline.outfile, which says which file it was.
        if exc.errno not in _OUTPUT_FULL or exc.filename is not None:
            raise
        _error(f"cannot write to standard output: {exc.strerror}")
        # What is still buffered goes nowhere, so the interpreter's own flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(2)


# What a byte that is not UTF-8 becomes in sys.argv.
_SURROGATE = re.compile(r"[\udc80-\udcff]")
# Standard output redirected to a full disk or an unwritable device. A closed pipe (`| head`) is
# not an error to report: click already exits quietly for it.
_OUTPUT_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


if __name__ == "__main__":
    main()
