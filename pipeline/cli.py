"""The `switchyard` command. Each command reads Settings once and calls the domain library.

A user's mistake (a bad file, a bad flag, an unreachable database) prints one sentence and exits
2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import ConfigError, SwitchyardError
from pipeline.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Route bulk Claude work between Haiku, Sonnet and Opus.")
db_app = typer.Typer(no_args_is_help=True, help="The database schema (Alembic migrations).")
jobs_app = typer.Typer(no_args_is_help=True, help="Job history.")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
# The HTTP API and its tokens live in their own module (pipeline/cli_api.py).
from pipeline.cli_api import serve, tenants_app, tokens_app  # noqa: E402

app.add_typer(tokens_app, name="tokens")
app.add_typer(tenants_app, name="tenants")
app.command()(serve)

console = Console()
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
) -> None:
    """Run a worker for one tier's queue."""
    s = settings()
    from workers.config import queue_names

    queues = queue_names(s)
    if tier not in queues:
        raise ConfigError(f"unknown tier {tier!r}: expected one of {', '.join(queues)}")
    # Model calls are I/O-bound and take seconds: 64 threads wait on them for the cost of one
    # process, where a prefork pool of 2 would hold 2 calls.
    n = concurrency or DEFAULT_CONCURRENCY.get(tier, 64)
    import workers.celery

    celery_app = workers.celery.app
    celery_app.conf.worker_concurrency = n
    celery_app.worker_main(["worker", "-Q", tier, "-P", pool.value, "-c", str(n), "-n", f"{tier}@%h",
                            "-l", loglevel, "--without-mingle", "--without-gossip"])


@app.command()
def dispatcher(
    interval: Annotated[float | None, typer.Option(help="Seconds between rounds.")] = None,
) -> None:
    """Feed queued jobs to the stages as capacity frees up, and republish stalled ones."""
    import logging
    import signal
    import threading

    from pipeline.dispatch import run_dispatcher
    from pipeline.runtime import build_pipeline
    from workers.base import publisher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = settings()
    import workers.celery

    p = build_pipeline(s, concurrency=4)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    err.print(f"dispatcher: max {s.max_in_flight} jobs in flight, stage deadline "
              f"{s.effective_stage_deadline_s:.0f} s")
    run_dispatcher(p, publisher(workers.celery.app), max_in_flight=s.max_in_flight,
                   interval_s=interval or s.dispatch_interval_s, deadline_s=s.effective_stage_deadline_s,
                   stop=stop)


@app.command("fake-claude")
def fake_claude(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Delay before each answer.")] = 0,
    latency_jitter_ms: Annotated[float, typer.Option(help="Extra uniform random delay.")] = 0,
    fault_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of requests that get a fault.")] = 0.0,
    faults: Annotated[str, typer.Option(help="Faults to draw from: 429,529,500,stall,drop,malformed,empty,refusal.")]
    = "429,529,500,stall,drop,malformed,empty,refusal",
    stall_seconds: Annotated[float, typer.Option(help="How long a 'stall' fault waits.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed for the fault draw.")] = 0,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute per model class, then 429.")] = None,
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


@app.command()
def enqueue(
    file: Annotated[Path, typer.Argument(help="Jobs, one per line (JSON Lines) or one per row (CSV).")],
    batch: Annotated[str | None, typer.Option(help="Batch name (default: the file's name).")] = None,
    format: Annotated[str | None, typer.Option("--format", help="jsonl or csv (default: by extension).")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Keep the good lines; write the bad ones to a report.")] = False,
    invalid_report: Annotated[Path | None, typer.Option(help="Where --skip-invalid writes bad lines.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Add a file of jobs to a batch. Re-running the same file adds no duplicates."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pipeline.db import make_engine, session_factory
    from pipeline.enqueue import enqueue_file, write_invalid_report

    s = settings()
    sessions = session_factory(make_engine(s.database_url))
    name = batch or file.stem
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("checking and writing")
        report = enqueue_file(
            sessions, file, batch=name, config=s.models, fmt=format, skip_invalid=skip_invalid,
            progress=lambda read, accepted: bar.update(
                task, description=f"read {read:,} lines, accepted {accepted:,} jobs"),
        )
    if report.invalid_count:
        target = invalid_report or file.with_name(file.name + ".invalid.jsonl")
        write_invalid_report(report, target)
    out = {"batch": report.batch, "batch_id": report.batch_id, "read": report.read, "accepted": report.accepted,
           "duplicates": report.duplicates, "invalid": report.invalid_count}
    if as_json:
        print(json.dumps(out))
        return
    console.print(f"batch [bold]{report.batch}[/]: {report.accepted:,} new job(s), {report.duplicates:,} already "
                  f"there, {report.invalid_count:,} invalid")
    if report.invalid_count:
        console.print(f"bad lines written to {target}")


@app.command()
def demo(
    jobs: Annotated[Path | None, typer.Option(help="Jobs file (default: the bundled sample).")] = None,
) -> None:
    """Run the whole pipeline on sample jobs: SQLite, in-process broker, fake Claude by default."""
    from pipeline.demo import run_demo

    summary = run_demo(settings(), console=console, jobs_file=jobs)
    print_summary(summary)


def print_summary(summary: Any) -> None:
    table = Table(title="Routing summary")
    for col in ("tier", "jobs ended here", "calls", "input tokens", "output tokens", "cost (USD)"):
        table.add_column(col, justify="right" if col != "tier" else "left")
    for t in summary.tiers:
        table.add_row(t.tier, str(t.jobs), str(t.calls), f"{t.input_tokens:,}", f"{t.output_tokens:,}",
                      _usd(t.cost_usd))
    table.add_row("[bold]total", str(summary.jobs), str(sum(t.calls for t in summary.tiers)),
                  f"{sum(t.input_tokens for t in summary.tiers):,}", f"{sum(t.output_tokens for t in summary.tiers):,}",
                  f"[bold]{_usd(summary.cost_usd)}")
    console.print(table)
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_status.items()))
    console.print(f"jobs: {summary.jobs} ({statuses})")
    console.print(f"escalations: {summary.escalations}   validation failures: {summary.validation_failures}")
    console.print(f"cost: {_usd(summary.cost_usd)} routed, against {_usd(summary.top_tier_cost_usd)} sending every "
                  f"job to {summary.top_tier}: saved {_usd(summary.saving)} ({summary.saving_ratio:.0%})")


def _usd(value: Decimal) -> str:
    return f"${value:,.6f}"


# -- entry point ---------------------------------------------------------------------------------------


def main() -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError as DatabaseError

    try:
        app()
    except SwitchyardError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except DatabaseError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        err.print(f"[red]error:[/] cannot use the database (DATABASE_URL): {first}", highlight=False)
        sys.exit(2)
    except BrokerError as exc:
        err.print(f"[red]error:[/] cannot reach the broker (BROKER_URL): {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
