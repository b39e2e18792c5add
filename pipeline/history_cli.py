"""The batch and history commands of `switchyard`: enqueue, cancel, jobs list|show, batches, stats
and export. Each reads Settings once, calls pipeline.history / pipeline.report / pipeline.enqueue,
and formats the result: a rich view for people, ``--json`` for scripts.

Registered on the app by pipeline.cli (imported at its end)."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session, sessionmaker

from pipeline import history
from pipeline.cli import app, console, err, failure_view, jobs_app, settings
from pipeline.errors import InputFileError, InvalidQuery, JobInputError
from pipeline.models import JobStatus

if TYPE_CHECKING:
    from pipeline.report import FailureReason

STATUS_ORDER = [s.value for s in JobStatus]
STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "queued": "dim"}

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


@contextmanager
def _sessions() -> Iterator[sessionmaker[Session]]:
    """A session factory for one command; its connections are closed when the command ends."""
    from pipeline.db import make_engine, session_factory

    engine = make_engine(settings().database_url, pool_size=2)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


@contextmanager
def _session() -> Iterator[Session]:
    with _sessions() as sessions, sessions() as session:
        yield session


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(history.jsonable(obj), ensure_ascii=False) + "\n")


def _usd(value: Decimal) -> str:
    return f"${value:,.6f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _when(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


# -- enqueue -----------------------------------------------------------------------------------------


@app.command()
def enqueue(
    file: Annotated[Path, typer.Argument(help="Jobs, one per line (JSON Lines) or one per row (CSV).")],
    batch: Annotated[str | None, typer.Option(help="Batch name (default: the file's name).")] = None,
    format: Annotated[str | None, typer.Option("--format", help="jsonl or csv (default: by extension).")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Keep the good lines; write the bad ones to a report.")] = False,
    invalid_report: Annotated[Path | None, typer.Option(
        help="Where --skip-invalid writes bad lines (default: FILE.invalid.jsonl).")] = None,
    wait: Annotated[bool, typer.Option(help="Then follow the batch to the end, with a live per-tier view.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Add a file of jobs to a batch. Re-running the same file adds no duplicates."""
    from pipeline.enqueue import Tick, enqueue_file, invalid_line_json

    s = settings()
    name = batch or file.stem
    target = invalid_report or file.with_name(file.name + ".invalid.jsonl")
    report_fh: IO[str] | None = None

    def on_invalid(bad: Any) -> None:
        nonlocal report_fh
        if report_fh is None:
            report_fh = target.open("w")
        report_fh.write(invalid_line_json(bad) + "\n")

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=err, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("reading", total=None)
        rewound = False

        def progress(t: Tick) -> None:
            nonlocal rewound
            if t.phase == "rewriting" and not rewound:
                # The file is read again from its start: a bar that reached its end has stopped
                # its clock, and would show it stopped for the whole second reading.
                bar.reset(task)
                rewound = True
            if t.phase == "checking":
                what = f"rejected, counting bad lines: {t.read:,} lines read"
            else:
                # "rewriting": the file repeats a key, so it is written again, each key checked.
                what = f"{t.phase}: {t.read:,} lines read, {t.accepted:,} jobs accepted"
            bar.update(task, description=what, completed=t.bytes_read, total=t.bytes_total)

        try:
            with _sessions() as sessions:
                report = enqueue_file(sessions, file, batch=name, config=s.models, fmt=format,
                                      skip_invalid=skip_invalid, progress=progress, on_invalid=on_invalid)
        except JobInputError as exc:
            if exc.line is None or isinstance(exc, InputFileError):
                raise
            raise JobInputError(f"{exc.reason}. Nothing was written: fix the file, or add --skip-invalid to enqueue "
                                f"the good lines", line=exc.line, source=exc.source) from None
        finally:
            if report_fh is not None:
                report_fh.close()
    out: dict[str, Any] = {"batch": report.batch, "batch_id": report.batch_id, "read": report.read,
                           "accepted": report.accepted, "duplicates": report.duplicates,
                           "invalid": report.invalid_count,
                           "invalid_report": str(target) if report.invalid_count else None}
    if as_json:
        if not wait:
            _print_json(out)
    else:
        console.print(f"batch [bold]{report.batch}[/]: {report.accepted:,} new job(s), {report.duplicates:,} already "
                      f"there, {report.invalid_count:,} invalid")
        if report.invalid_count:
            console.print(f"bad lines written to {target}")
    if wait:
        assert report.batch_id is not None
        with _sessions() as sessions:
            final, reasons = _follow(sessions, report.batch_id, name, quiet=as_json)
        if as_json:
            _print_json({**out, "progress": final, "failure_reasons": reasons})


def _progress_view(name: str, p: history.BatchProgress, elapsed: float,
                   reasons: list[FailureReason]) -> Group:
    table = Table(title=f"batch {name}: {p.done:,}/{p.total:,} done, {_usd(p.cost_usd)} so far, {elapsed:,.0f} s",
                  title_justify="left")
    table.add_column("tier")
    for status in STATUS_ORDER:
        table.add_column(status, justify="right", style=STATUS_STYLE.get(status, ""))
    for tier in sorted(p.by_tier, key=lambda t: (t == "-", t)):
        counts = p.by_tier[tier]
        table.add_row("(not triaged)" if tier == "-" else tier, *(f"{counts.get(s, 0):,}" for s in STATUS_ORDER))
    table.add_row("[bold]all", *(f"[bold]{p.by_status.get(s, 0):,}" for s in STATUS_ORDER))
    if not reasons:
        return Group(table)
    return Group(table, failure_view(reasons, failed=p.by_status.get("failed", 0)))


def _follow(sessions: sessionmaker[Session], batch_id: int, name: str, *, quiet: bool,
            interval_s: float = 1.0) -> tuple[history.BatchProgress, list[FailureReason]]:
    """Redraw the batch's per-tier counts, and its most common failure reasons once some job has
    failed, until every job is terminal. Ctrl-C stops following, not the batch."""
    from pipeline.report import failure_reasons

    def poll() -> tuple[history.BatchProgress, list[FailureReason]]:
        with sessions() as session:
            p = history.batch_progress(db_session=session, batch_id=batch_id)
            return p, failure_reasons(session, batch_id=batch_id) if p.by_status.get("failed") else []

    start = time.monotonic()
    sys.stdout.flush()
    p, reasons = poll()
    try:
        with Live(_progress_view(name, p, 0, reasons), console=err, refresh_per_second=2,
                  transient=False, auto_refresh=False) as live:
            live.update(_progress_view(name, p, 0, reasons), refresh=not quiet)
            while p.done < p.total:
                time.sleep(interval_s)
                asked = time.monotonic()
                p, reasons = poll()
                # Counting a million-job batch takes a good part of a second: poll it less often,
                # so that following a batch never becomes a load of its own.
                interval_s = max(interval_s, 5 * (time.monotonic() - asked))
                if not quiet:
                    live.update(_progress_view(name, p, time.monotonic() - start, reasons), refresh=True)
    except KeyboardInterrupt:
        err.print(f"stopped following batch {name}; its jobs go on (`switchyard batches` shows them)")
        raise typer.Exit(130) from None
    return p, reasons


# -- cancel ------------------------------------------------------------------------------------------


@app.command()
def cancel(
    batch: Annotated[str, typer.Argument(help="Batch name (or id).")],
    as_json: JsonFlag = False,
) -> None:
    """Cancel the batch's jobs that have not started yet. Jobs already running finish."""
    with _session() as session:
        result = history.cancel_batch(db_session=session, batch=batch)
    if as_json:
        _print_json(result)
        return
    console.print(f"batch [bold]{result.batch}[/]: cancelled {result.cancelled:,} job(s) that had not started")


# -- jobs ----------------------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    batch: Annotated[str | None, typer.Option(help="Only this batch (name or id).")] = None,
    status: Annotated[list[str] | None, typer.Option(
        help="Only jobs in this status; repeat for several (queued, triaging, working, validating, succeeded, "
             "failed, cancelled).")] = None,
    tier: Annotated[str | None, typer.Option(help="Only jobs whose current (or final) tier is this.")] = None,
    kind: Annotated[str | None, typer.Option(help="classify, extract, draft or generate.")] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after: ISO 8601, or an age like 30m, 6h, 2d.")]
    = None,
    until: Annotated[str | None, typer.Option(help="Created before: ISO 8601, or an age like 30m, 6h, 2d.")] = None,
    key_prefix: Annotated[str | None, typer.Option(help="Only keys starting with this.")] = None,
    limit: Annotated[int, typer.Option(help=f"Jobs per page (1-{history.MAX_LIMIT}).")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue after the page that printed this cursor.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List jobs, newest first, a page at a time."""
    filters = history.JobFilters(
        batch=batch, status=tuple(history.parse_status(x) for x in status or ()), tier=tier,
        kind=history.parse_kind(kind) if kind else None,
        since=history.parse_time(since, option="--since") if since else None,
        until=history.parse_time(until, option="--until") if until else None,
        key_prefix=key_prefix,
    )
    with _session() as session:
        page = history.list_jobs(db_session=session, filters=filters, limit=limit, cursor=cursor)
    if as_json:
        _print_json(page)
        return
    table = Table()
    for col in ("id", "batch", "key", "kind", "status", "tier", "esc", "cost", "created", "error"):
        table.add_column(col, justify="right" if col in ("id", "esc", "cost") else "left",
                         overflow="fold" if col == "key" else "ellipsis", no_wrap=col == "error")
    for j in page.jobs:
        table.add_row(str(j.id), j.batch, j.key, j.kind, Text(j.status, style=STATUS_STYLE.get(j.status, "")),
                      j.tier or "-", str(j.escalations), _usd(j.cost_usd), _when(j.created_at),
                      (j.error or "")[:60])
    console.print(table)
    if page.next_cursor:
        console.print(f"more: add --cursor {page.next_cursor}")
    elif not page.jobs:
        console.print("no jobs match")


@jobs_app.command("show")
def jobs_show(
    job: Annotated[str, typer.Argument(metavar="ID", help="The job's id (from `jobs list`), or its key with --batch.")],
    batch: Annotated[str | None, typer.Option(help="Read ID as the job's key in this batch.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The whole story of one job: input, routing, every model call, validation and the result."""
    with _session() as session:
        if batch is not None:
            job_id = history.find_job_id(db_session=session, batch=batch, key=job)
        elif job.isdigit():
            job_id = int(job)
        else:
            raise InvalidQuery(f"{job!r} is not a job id; to look a job up by its key, add --batch BATCH")
        story = history.get_job(db_session=session, job_id=job_id)
    if as_json:
        _print_json({**history.jsonable(story), "triage": history.jsonable(story.triage),
                     "escalations": history.jsonable(story.escalations)})
        return
    j = story.job
    console.print(f"[bold]job {j.id}[/]  key {j.key}  batch {j.batch}  kind {j.kind}")
    console.print(Text.assemble("status ", (j.status, STATUS_STYLE.get(j.status, "bold")),
                                f"   tier {j.tier or '-'}   attempt {j.attempt}   escalations {j.escalations}"
                                f"   cost {_usd(j.cost_usd)}"))
    console.print(f"created {_when(j.created_at)}   finished {_when(j.finished_at)}")
    console.rule("input")
    console.print_json(json.dumps({"payload": story.payload, "metadata": story.metadata,
                                   "pinned_tier": story.pinned_tier}, ensure_ascii=False))

    console.rule("routing")
    triage = story.triage
    if triage is not None:
        conf = "-" if triage.confidence is None else f"{triage.confidence:.2f}"
        console.print(f"triage verdict [bold]{triage.verdict}[/] (confidence {conf}) -> {triage.to_tier}: "
                      f"{triage.reason or ''}", highlight=False)
    for r in story.routing:
        if r.reason_kind != "triage":
            console.print(f"{_when(r.at)}  {r.reason_kind}: {r.from_tier or '-'} -> {r.to_tier}"
                          f"{': ' + r.reason if r.reason else ''}", highlight=False)
    if not story.routing:
        console.print("(not routed yet)")

    calls = Table(title="model calls", title_justify="left")
    for col in ("#", "stage", "tier", "model", "try", "delivery", "outcome", "in", "out", "cost", "latency", "request"):
        calls.add_column(col, justify="right" if col in ("#", "try", "delivery", "in", "out", "cost", "latency")
                         else "left")
    for c in story.calls:
        outcome = c.outcome if c.applied or c.outcome != "ok" else "ok (not applied)"
        if c.error_type:
            outcome += f" {c.status_code or ''} {c.error_type}"
        calls.add_row(str(c.id), c.stage, c.tier, c.model, str(c.attempt), str(c.delivery), outcome,
                      f"{c.input_tokens:,}", f"{c.output_tokens:,}", _usd(c.cost_usd), _ms(c.latency_ms),
                      c.request_id or "-")
    console.print(calls)

    verdicts = Table(title="validation", title_justify="left")
    for col in ("tier", "attempt", "validator", "verdict", "problems"):
        verdicts.add_column(col)
    for v in story.validations:
        verdicts.add_row(v.tier, str(v.attempt), v.validator, "[green]ok" if v.ok else "[red]failed",
                         "; ".join(v.problems))
    console.print(verdicts)

    events = Table(title="timeline", title_justify="left")
    for col in ("at", "from", "to", "detail"):
        events.add_column(col)
    for e in story.events:
        events.add_row(_when(e.at), e.from_status or "-", e.to_status, e.detail or "")
    console.print(events)

    console.rule("result")
    if j.error:
        console.print(f"[red]error:[/] {j.error}", highlight=False)
    if story.output is not None:
        console.print_json(json.dumps(story.output, ensure_ascii=False))
    elif not j.error:
        console.print("(no output yet)")


# -- batches, stats, export ------------------------------------------------------------------------


@app.command()
def batches(
    limit: Annotated[int, typer.Option(help="How many of the newest batches.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Batches, newest first, with their jobs per status and their cost."""
    with _session() as session:
        rows = history.list_batches(db_session=session, limit=limit)
    if as_json:
        _print_json([{**history.jsonable(b), "done": b.done, "finished": b.finished} for b in rows])
        return
    table = Table()
    for col in ("id", "batch", "created", "jobs", *STATUS_ORDER, "cost"):
        table.add_column(col, justify="left" if col in ("batch", "created") else "right",
                         style=STATUS_STYLE.get(col, ""))
    for b in rows:
        name = b.name + (" [yellow](cancelled)" if b.cancelled_at else "")
        table.add_row(str(b.id), name, _when(b.created_at), f"{b.jobs:,}",
                      *(f"{b.by_status.get(s, 0):,}" for s in STATUS_ORDER), _usd(b.cost_usd))
    console.print(table if rows else "no batches yet")


@app.command()
def stats(
    batch: Annotated[str | None, typer.Option(help="Only this batch (name or id).")] = None,
    since: Annotated[str | None, typer.Option(help="Jobs created at or after: ISO 8601, or an age like 6h, 2d.")]
    = None,
    until: Annotated[str | None, typer.Option(help="Jobs created before: ISO 8601, or an age like 6h, 2d.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Per tier: jobs, calls, tokens, cost, latency, escalation and validation failure rates, and the
    saving against sending every job to the top tier."""
    from pipeline.report import summarize

    s = settings()
    with _session() as session:
        batch_id = history.find_batch(db_session=session, batch=batch).id if batch else None
        summary = summarize(session, s.models, batch_id=batch_id,
                            since=history.parse_time(since, option="--since") if since else None,
                            until=history.parse_time(until, option="--until") if until else None)
    if as_json:
        _print_json(summary.to_dict())
        return
    table = Table(title="per tier" + (f" (batch {batch})" if batch else ""), title_justify="left")
    cols = ("tier", "jobs", "calls", "in tokens", "out tokens", "cost", "p50", "p95", "escalated", "valid. failed",
            "failed calls", "repeated", "abandoned")
    for col in cols:
        table.add_column(col, justify="left" if col == "tier" else "right")
    for t in summary.tiers:
        table.add_row(t.tier, f"{t.jobs:,}", f"{t.calls:,}", f"{t.input_tokens:,}", f"{t.output_tokens:,}",
                      _usd(t.cost_usd), _ms(t.p50_latency_ms), _ms(t.p95_latency_ms),
                      f"{t.escalations:,} ({_rate(t.escalation_rate)})",
                      f"{t.validation_failures:,} ({_rate(t.validation_failure_rate)})", f"{t.failed_calls:,}",
                      f"{t.repeated_calls:,}", f"{t.abandoned_calls:,}")
    table.add_row("[bold]total", f"[bold]{summary.jobs:,}", f"{sum(t.calls for t in summary.tiers):,}",
                  f"{sum(t.input_tokens for t in summary.tiers):,}",
                  f"{sum(t.output_tokens for t in summary.tiers):,}", f"[bold]{_usd(summary.cost_usd)}")
    console.print(table)
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.by_status.items())) or "none"
    console.print(f"jobs: {summary.jobs:,} ({statuses})")
    console.print(f"cost: {_usd(summary.cost_usd)} routed, against {_usd(summary.top_tier_cost_usd)} sending every "
                  f"job to {summary.top_tier}: saved {_usd(summary.saving)} ({summary.saving_ratio:.0%})")
    if summary.failure_reasons:
        console.print(failure_view(summary.failure_reasons, failed=summary.by_status.get("failed", 0)))
    console.print("jobs = jobs whose last tier it is; escalated = jobs moved up from the tier, out of those it "
                  "worked; repeated = calls made by a repeated delivery of a stage", style="dim")


@contextmanager
def _output(out: Path | None) -> Iterator[IO[str]]:
    if out is None:
        yield sys.stdout
        return
    try:
        fh = out.open("w", newline="")
    except OSError as exc:
        raise InvalidQuery(f"cannot write {out}: {exc.strerror}") from None
    with fh:
        yield fh


@app.command()
def export(
    batch: Annotated[str, typer.Argument(help="Batch name (or id).")],
    format: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of standard output.")] = None,
) -> None:
    """Stream a batch's results (key, status, tier, output, error, cost) in the order it was
    enqueued. In CSV the output cell is JSON unless it is a plain string."""
    if format not in ("jsonl", "csv"):
        raise InvalidQuery(f"unknown format {format!r}: expected jsonl or csv")
    n = 0
    with _session() as session, _output(out) as fh:
        b = history.find_batch(db_session=session, batch=batch)
        rows = history.iter_results(db_session=session, batch_id=b.id)
        if format == "jsonl":
            for r in rows:
                fh.write(json.dumps(history.jsonable(r), ensure_ascii=False) + "\n")
                n += 1
        else:
            writer = csv.writer(fh)
            writer.writerow(history.EXPORT_FIELDS)
            for r in rows:
                output = r.output if isinstance(r.output, str) or r.output is None else json.dumps(
                    r.output, ensure_ascii=False)
                writer.writerow([r.key, r.status, r.tier or "", output or "", r.error or "", f"{r.cost_usd:f}"])
                n += 1
    if out is not None:
        err.print(f"wrote {n:,} result(s) of batch {b.name} to {out}")
