"""The batch and history commands of `switchyard`: enqueue, cancel, jobs list|show, batches, stats
and export. Each reads Settings once, calls the read side (pipeline.queries) or intake
(pipeline.intake.enqueue), and formats the result: a rich view for people, ``--json`` for scripts.

Registered on the app when pipeline.cli.app imports it."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session, sessionmaker

from pipeline.cli.budgets import budget_line
from pipeline.cli.common import app, batches_app, console, err, failure_view, jobs_app, settings
from pipeline.cli.outfile import Output, write_whole
from pipeline.cli.tables import Unit, compact, cost_line, economy_line, new_table, when
from pipeline.errors import InputFileError, InvalidInput, InvalidQuery, JobInputError, OutputError
from pipeline.names import check_batch_name, escaped
from pipeline.queries import history

if TYPE_CHECKING:
    from pipeline.flow.budgets import BudgetState
    from pipeline.intake.enqueue import EnqueueReport
    from pipeline.queries.report import FailureReason, Summary
    from pipeline.settings import Settings

STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "queued": "dim"}
# The tables count the three stages together as "running": seven status columns do not fit 80.
RUNNING = ("triaging", "working", "validating")
STATUS_GROUPS = ("queued", "running", "succeeded", "failed", "cancelled")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
WideFlag = Annotated[bool, typer.Option("--wide", help="More columns, for a terminal wider than 80.")]
# Batch names are unique per tenant only: a name that several batches hold (of different tenants,
# or one of no tenant) is refused with the list of them, and this (or the batch id) picks one.
TenantOpt = Annotated[str | None, typer.Option(
    "--tenant", help="Look in this tenant's batches and jobs only. A batch name that several batches hold (of "
                     "different tenants, or one of no tenant) needs it, or the batch id.")]


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


def _grouped(by_status: dict[str, int]) -> list[int]:
    """Jobs per STATUS_GROUPS."""
    counts = {**by_status, "running": sum(by_status.get(s, 0) for s in RUNNING)}
    return [counts.get(g, 0) for g in STATUS_GROUPS]


def _tenant_id(session: Session, tenant: str | None) -> int | None:
    """The id of the tenant --tenant names, None without --tenant. A tenant that does not exist is
    refused, never made: a mistyped name would otherwise read as an empty one."""
    from pipeline import tenants

    return tenants.require(session, tenant).id if tenant is not None else None


def _plain(value: str | None, *, style: str = "") -> Text:
    """Text that came from a tenant, a file or a model (a key, a batch name, an error, a model's
    reason), to show as it is: never read as rich markup, and with what the terminal would act on
    shown escaped (``\\x1b``)."""
    return Text(escaped(value or ""), style=style)


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
    tenant: Annotated[str | None, typer.Option(
        "--tenant", help="Enqueue into this tenant's batch, which its API token then sees, under its limits as its "
                         "API submissions are (so in one transaction, even with --skip-invalid). The tenant must "
                         "exist: `switchyard tokens create --tenant NAME` makes one. Without --tenant the batch is "
                         "the operator's own, which no API token sees.")] = None,
    shadow_rate: Annotated[float | None, typer.Option(
        help="The share of this batch's jobs that shadow evaluation samples, from 0 to 1 (see `switchyard "
             "quality`); default: the task's shadow_rate, else the configuration's [routing] shadow_rate.")] = None,
    priority: Annotated[int | None, typer.Option(
        help="The batch's priority, 0-9: the dispatcher admits higher priorities first, and round robin across "
             "tenants and batches within one; default: the task's priority, else 5. Given for a batch that exists, "
             "it changes the batch's.")] = None,
    mode: Annotated[str | None, typer.Option(
        help="standard (synchronous calls) or economy (every model call through the Message Batches API, at "
             "half price, answers within hours rather than seconds); default: the task's mode, else "
             "standard.")] = None,
    budget_usd: Annotated[str | None, typer.Option(
        "--budget-usd", help="The batch's spending cap in USD: no call is made that could take its spend over it, "
                             "and jobs that do not fit pause (see `switchyard batches budget`).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add a file of jobs to a batch. Re-running the same file adds no duplicates."""
    from pipeline.flow.budgets import check_budget
    from pipeline.intake.enqueue import input_size

    s = settings()
    name = _batch_name(batch, file)
    target = invalid_report or file.with_name(file.name + ".invalid.jsonl")
    if invalid_report is not None and not skip_invalid:
        raise InvalidInput("--invalid-report is only used with --skip-invalid: add that, or leave the report out")
    if shadow_rate is not None and not 0 <= shadow_rate <= 1:
        raise InvalidInput(f"--shadow-rate must be a number from 0 to 1 (the share of jobs shadowed), "
                           f"not {shadow_rate}")
    if priority is not None:
        from pipeline.flow.admission import check_priority

        check_priority(priority, what="--priority")
    if mode is not None and mode not in ("standard", "economy"):
        raise InvalidInput(f"--mode must be standard or economy, not {mode!r}")
    budget = None if budget_usd is None else check_budget(budget_usd)  # before anything is read
    input_size(file)  # a missing input is the first thing to say, before where its report would go
    if skip_invalid and _same_file(target, file):
        raise InvalidInput(f"--invalid-report {target} is the input file itself: name another file for the report")
    tenant_id = _admitted_tenant(tenant) if tenant is not None else None
    started = False
    report: EnqueueReport | None = None
    try:
        # The report is made (as a temporary file) before anything is read, so a report that
        # cannot be written is refused before the first job is; it replaces TARGET at the end, and
        # only if there was a bad line.
        with write_whole(target, keep_empty=False) if skip_invalid else nullcontext() as report_out:
            started = True
            report = _enqueue_with_progress(s, file, name=name, tenant_id=tenant_id, fmt=format,
                                            skip_invalid=skip_invalid, report_out=report_out, quiet=as_json,
                                            shadow_rate=shadow_rate, priority=priority, mode=mode,
                                            budget_usd=budget)
    except OutputError as exc:
        if not started:
            raise
        if report is None and tenant_id is not None:  # one transaction, rolled back with the report
            raise OutputError(f"{exc}; nothing was enqueued") from None
        # --skip-invalid commits as it goes: what was written before the report failed stays.
        raise OutputError(f"{exc}; the jobs enqueued before that stay, and running the same command again adds "
                          f"only the rest") from None
    assert report is not None
    if report.batch_id is None:
        raise JobInputError(f"none of the {report.read:,} lines of {file} is a valid job, so nothing was enqueued; "
                            f"the bad lines are in {target}")
    out: dict[str, Any] = {"batch": report.batch, "batch_id": report.batch_id, "tenant": tenant, "read": report.read,
                           "accepted": report.accepted, "duplicates": report.duplicates,
                           "invalid": report.invalid_count,
                           "invalid_report": str(target) if report.invalid_count else None}
    if as_json:
        if not wait:
            _print_json(out)
    else:
        console.print(Text.assemble("batch ", _plain(report.batch, style="bold"),
                                    *((" of tenant ", _plain(tenant)) if tenant else ()),
                                    f": {report.accepted:,} new job(s), {report.duplicates:,} already there, "
                                    f"{report.invalid_count:,} invalid"))
        if report.invalid_count:
            console.print(Text(f"bad lines written to {target}"))
    if wait:
        assert report.batch_id is not None
        with _sessions() as sessions:
            final, reasons = _follow(sessions, report.batch_id, name, quiet=as_json)
        if as_json:
            _print_json({**out, "progress": final, "failure_reasons": reasons})


def _admitted_tenant(name: str) -> int:
    """The id of the tenant to enqueue for, refused (as its API submissions are) if it is over its
    daily spend already: before its file is read. Its jobs in flight are checked once they are
    written, in the same transaction (pipeline.intake.enqueue)."""
    from pipeline import tenants

    with _session() as session:
        tenant = tenants.require(session, name)
        tenants.check_spend(session, tenant)
        return tenant.id


def _batch_name(batch: str | None, file: Path) -> str:
    if batch is not None:
        return check_batch_name(batch)
    try:
        return check_batch_name(file.stem)
    except JobInputError as exc:
        raise JobInputError(f"{exc} (it comes from the file's name: give one with --batch)") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _enqueue_with_progress(s: Settings, file: Path, *, name: str, tenant_id: int | None, fmt: str | None,
                           skip_invalid: bool, report_out: Output | None, quiet: bool,
                           shadow_rate: float | None = None, priority: int | None = None,
                           mode: str | None = None, budget_usd: Decimal | None = None) -> EnqueueReport:
    """enqueue_file with a progress bar; bad lines go to ``report_out`` (--skip-invalid)."""
    from pipeline.intake.enqueue import BadLine, Tick, enqueue_file, invalid_line_json

    def on_invalid(bad: BadLine) -> None:
        assert report_out is not None  # only --skip-invalid reports bad lines rather than stop at one
        report_out.write(invalid_line_json(bad) + "\n")

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=err, disable=quiet or not err.is_terminal) as bar:
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
                return enqueue_file(sessions, file, batch=name, config=s.models, tenant_id=tenant_id, fmt=fmt,
                                    skip_invalid=skip_invalid, progress=progress, on_invalid=on_invalid,
                                    shadow_rate=shadow_rate, priority=priority, mode=mode, budget_usd=budget_usd)
        except JobInputError as exc:
            if exc.line is None or isinstance(exc, InputFileError):
                raise
            raise JobInputError(f"{exc.reason}. Nothing was written: fix the file, or add --skip-invalid to enqueue "
                                f"the good lines", line=exc.line, source=exc.source) from None


def _progress_view(name: str, p: history.BatchProgress, elapsed: float,
                   reasons: list[FailureReason]) -> Group:
    title = Text.assemble("batch ", _plain(name), f": {compact(p.done)}/{compact(p.total)} done, "
                          f"{compact(p.cost_usd, 'usd')} so far, {compact(elapsed, 's')}")
    table = new_table(("tier", *STATUS_GROUPS), figures=STATUS_GROUPS, title=title, styles=STATUS_STYLE)
    for tier in sorted(p.by_tier, key=lambda t: (t == "-", t)):
        table.add_row(Text("(not triaged)" if tier == "-" else tier), *map(compact, _grouped(p.by_tier[tier])))
    table.add_row(Text("all", style="bold"), *(Text(compact(n), style="bold") for n in _grouped(p.by_status)))
    if not reasons:
        return Group(table)
    return Group(table, failure_view(reasons, failed=p.by_status.get("failed", 0)))


def _follow(sessions: sessionmaker[Session], batch_id: int, name: str, *, quiet: bool,
            interval_s: float = 1.0) -> tuple[history.BatchProgress, list[FailureReason]]:
    """Redraw the batch's per-tier counts, and its most common failure reasons once some job has
    failed, until every job is terminal. Ctrl-C stops following, not the batch."""
    from pipeline.queries.report import failure_reasons

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
        err.print(Text.assemble("stopped following batch ", _plain(name),
                                "; its jobs go on (`switchyard batches` shows them)"))
        raise typer.Exit(130) from None
    return p, reasons


# -- cancel ------------------------------------------------------------------------------------------


@app.command()
def cancel(
    batch: Annotated[str, typer.Argument(help="Batch name (or id).")],
    tenant: TenantOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Cancel the batch's jobs that are not being worked: not started yet, or waiting out transient
    errors before trying again. Jobs in a call right now finish."""
    with _session() as session:
        result = history.cancel_batch(db_session=session, batch=batch, tenant_id=_tenant_id(session, tenant))
    if as_json:
        _print_json(result)
        return
    console.print(Text.assemble("batch ", _plain(result.batch, style="bold"),
                                f": cancelled {result.cancelled:,} job(s): {result.cancelled - result.waiting:,} "
                                f"that had not started, {result.waiting:,} waiting out transient errors"))


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
    tenant: TenantOpt = None,
    wide: WideFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """List jobs, newest first, a page at a time."""
    filters = history.JobFilters.read(batch=batch, status=status, tier=tier, kind=kind, since=since, until=until,
                                      key_prefix=key_prefix, flag="--")
    with _session() as session:
        filters = replace(filters, tenant_id=_tenant_id(session, tenant))
        page = history.list_jobs(db_session=session, filters=filters, limit=limit, cursor=cursor)
    if as_json:
        _print_json(page)
        return
    console.print(_jobs_table(page.jobs, wide=wide, batch_column=batch is None))
    if page.next_cursor:
        console.print(f"more: add --cursor {page.next_cursor}")
    elif not page.jobs:
        console.print("no jobs match")


def _jobs_table(jobs: list[history.JobSummary], *, wide: bool, batch_column: bool) -> Table:
    cols: tuple[str, ...] = (("id", "batch", "key", "kind", "status", "tier", "esc", "cost", "created", "error")
                             if wide else ("id", "batch", "key", "status", "tier", "cost"))
    if not batch_column:  # --batch named it: the room goes to the key
        cols = tuple(c for c in cols if c != "batch")
    table = new_table(cols, figures=("id", "esc", "cost"), whole=("created",))
    for j in jobs:
        cells: dict[str, RenderableType] = {
            "id": str(j.id), "batch": _plain(j.batch), "key": _plain(j.key), "kind": j.kind,
            "status": Text(j.status, style=STATUS_STYLE.get(j.status, "")), "tier": j.tier or "-",
            "esc": compact(j.escalations), "cost": compact(j.cost_usd, "usd"), "created": when(j.created_at),
            # One line, cut to the room left: `jobs show` prints it whole.
            "error": Text(escaped(" ".join((j.error or "").split())), no_wrap=True, overflow="ellipsis")}
        table.add_row(*(cells[c] for c in cols))
    return table


@jobs_app.command("show")
def jobs_show(
    job: Annotated[str, typer.Argument(metavar="ID", help="The job's id (from `jobs list`), or its key with --batch.")],
    batch: Annotated[str | None, typer.Option(help="Read ID as the job's key in this batch.")] = None,
    tenant: TenantOpt = None,
    wide: WideFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """The whole story of one job: input, routing, every model call, validation and the result."""
    with _session() as session:
        tenant_id = _tenant_id(session, tenant)
        if batch is not None:
            job_id = history.find_job_id(db_session=session, batch=batch, key=job, tenant_id=tenant_id)
        else:
            parsed = history.parse_id(job)
            if parsed is None:
                raise InvalidQuery(f"{job!r} is not a job id (a whole number up to {history.MAX_ID}); to look a "
                                   f"job up by its key, add --batch BATCH")
            job_id = parsed
        story = history.get_job(db_session=session, job_id=job_id, tenant_id=tenant_id)
    if as_json:
        _print_json({**history.jsonable(story), "triage": history.jsonable(story.triage),
                     "escalations": history.jsonable(story.escalations)})
        return
    j = story.job
    console.print(Text.assemble((f"job {j.id}", "bold"), "  key ", _plain(j.key), "  batch ", _plain(j.batch),
                                f"  kind {j.kind}"))
    console.print(Text.assemble("status ", (j.status, STATUS_STYLE.get(j.status, "bold")),
                                f"   tier {j.tier or '-'}   attempt {j.attempt}   escalations {j.escalations}"
                                f"   cost {compact(j.cost_usd, 'usd')}"))
    console.print(f"created {when(j.created_at)}   finished {when(j.finished_at)}")
    if story.task is not None:
        console.print(Text.assemble("task ", _plain(story.task), f"  version {story.task_version}"))
    if story.mode == "economy" or story.economy_note:
        console.print(Text.assemble("mode economy (calls through message batches)",
                                    *((": ", _plain(story.economy_note)) if story.economy_note else ())))
    if story.next_try_at is not None:
        console.print(Text.assemble(("waiting out transient errors", "yellow"),
                                    f": next try {when(story.next_try_at)}, meeting only transient errors since "
                                    f"{when(story.transient_since)}"))
    console.rule("input")
    console.print_json(json.dumps({"payload": story.payload, "metadata": story.metadata,
                                   "pinned_tier": story.pinned_tier}, ensure_ascii=False))

    console.rule("routing")
    triage = story.triage
    if triage is not None:
        conf = "-" if triage.confidence is None else f"{triage.confidence:.2f}"
        console.print(Text.assemble("triage verdict ", _plain(triage.verdict, style="bold"),
                                    f" (confidence {conf}) -> {triage.to_tier}: ", _plain(triage.reason)))
    for r in story.routing:
        if r.reason_kind != "triage":
            console.print(Text.assemble(f"{when(r.at)}  {r.reason_kind}: {r.from_tier or '-'} -> {r.to_tier}",
                                        *((": ", _plain(r.reason)) if r.reason else ())))
    if not story.routing:
        console.print("(not routed yet)")

    console.print(_calls_table(story.calls, wide=wide))

    verdicts = new_table(("tier", "attempt", "validator", "verdict", "problems"), figures=("attempt",),
                         title="validation")
    for v in story.validations:
        verdicts.add_row(v.tier, str(v.attempt), v.validator, Text("ok", "green") if v.ok else Text("failed", "red"),
                         _plain("; ".join(v.problems)))
    console.print(verdicts)

    events = new_table(("at", "from", "to", "detail"), whole=("at",), title="timeline")
    for e in story.events:
        events.add_row(when(e.at), e.from_status or "-", e.to_status, _plain(e.detail))
    console.print(events)

    console.rule("result")
    if j.error:
        console.print(Text.assemble(("error:", "red"), " ", _plain(j.error)))
    if story.output is not None:
        console.print_json(json.dumps(story.output, ensure_ascii=False))
    elif not j.error:
        console.print("(no output yet)")


def _calls_table(calls: list[history.CallRecord], *, wide: bool) -> Table:
    cols: tuple[str, ...] = (
        ("#", "stage", "tier", "model", "try", "delivery", "outcome", "in", "out", "cost", "latency", "request")
        if wide else ("stage", "tier", "try", "outcome", "in", "out", "cost", "latency"))
    if any(c.message_batch_id for c in calls):
        # Economy mode: which message batch answered each call (latency: from its submission).
        cols += ("message batch",)
    table = new_table(cols, figures=("#", "try", "delivery", "in", "out", "cost", "latency"),
                      whole=("request", "message batch"), title="model calls")
    for c in calls:
        outcome = c.outcome if c.applied or c.outcome != "ok" else "ok (not applied)"
        if c.error_type:
            outcome += f" {c.status_code or ''} {c.error_type}"
        cells: dict[str, RenderableType] = {
            "#": str(c.id), "stage": c.stage, "tier": c.tier, "model": c.model, "try": str(c.attempt),
            "delivery": str(c.delivery), "outcome": Text(outcome), "in": compact(c.input_tokens),
            "out": compact(c.output_tokens), "cost": compact(c.cost_usd, "usd"), "latency": compact(c.latency_ms, "ms"),
            "request": c.request_id or "-", "message batch": c.message_batch_id or "-"}
        table.add_row(*(cells[col] for col in cols))
    return table


# -- batches, stats, export ------------------------------------------------------------------------


@batches_app.callback(invoke_without_command=True)
def batches(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many of the newest batches.")] = 50,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's batches.")] = None,
    wide: WideFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Batches, newest first, with their tenant, priority, jobs per status, cost and budget; then
    each tenant's share of the jobs in flight now."""
    if ctx.invoked_subcommand is not None:
        return
    from pipeline.flow import budgets
    from pipeline.queries.shares import describe, tenant_shares

    with _session() as session:
        rows = history.list_batches(db_session=session, limit=limit, tenant_id=_tenant_id(session, tenant))
        spend = budgets.states(session, [b.id for b in rows])
        shares = tenant_shares(session) if rows and not as_json else []
    if as_json:
        _print_json([{**history.jsonable(b), "done": b.done, "finished": b.finished,
                      "budget": history.jsonable(spend[b.id].as_dict())} for b in rows])
        return
    console.print(_batches_table(rows, wide=wide, tenant_shown=tenant is None, spend=spend) if rows
                  else "no batches yet")
    if rows:
        console.print(Text(describe(shares)))


def _batches_table(rows: list[history.BatchSummary], *, wide: bool, tenant_shown: bool,
                   spend: dict[int, BudgetState] | None = None) -> Table:
    # "cancelled" and "created" only with --wide: a cancelled batch says so after its name, and a
    # tenant's batch names the tenant under it (a column of its own leaves each text a few letters).
    groups = STATUS_GROUPS if wide else STATUS_GROUPS[:-1]
    cols = ("id", "batch", *(("created",) if wide else ()), "priority", "jobs", *groups, "cost")
    table = new_table(cols, figures=("id", "priority", "jobs", *groups, "cost"), whole=("created",),
                      styles=STATUS_STYLE)
    for b in rows:
        cells: dict[str, RenderableType] = {
            "id": str(b.id),
            "batch": Text.assemble(_plain(b.name), (" (cancelled)", "yellow") if b.cancelled_at else "",
                                   *(("\ntenant ", _plain(b.tenant)) if b.tenant is not None and tenant_shown else ()),
                                   budget_line(spend.get(b.id) if spend else None)),
            "created": when(b.created_at), "priority": str(b.priority), "jobs": compact(b.jobs),
            "cost": compact(b.cost_usd, "usd"),
            **{g: compact(n) for g, n in zip(STATUS_GROUPS, _grouped(b.by_status), strict=True)}}
        table.add_row(*(cells[c] for c in cols))
    return table


@app.command()
def stats(
    batch: Annotated[str | None, typer.Option(help="Only this batch (name or id).")] = None,
    since: Annotated[str | None, typer.Option(help="Jobs created at or after: ISO 8601, or an age like 6h, 2d.")]
    = None,
    until: Annotated[str | None, typer.Option(help="Jobs created before: ISO 8601, or an age like 6h, 2d.")] = None,
    tenant: TenantOpt = None,
    wide: WideFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Per tier: jobs, calls, tokens, cost, the cache hit rate and what caching saved, latency,
    escalation and validation failure rates, and the saving against sending every job to the top tier."""
    from pipeline.flow import economy
    from pipeline.queries.report import _job_filter, summarize

    s = settings()
    with _session() as session:
        tenant_id = _tenant_id(session, tenant)
        batch_id = history.find_batch(db_session=session, batch=batch, tenant_id=tenant_id).id if batch else None
        window = dict(since=history.parse_time(since, option="--since") if since else None,
                      until=history.parse_time(until, option="--until") if until else None)
        summary = summarize(session, s.models, batch_id=batch_id, tenant_id=tenant_id, **window)
        saved = economy.saving(session, batch_multiplier=s.models.batch_multiplier,
                               job_filter=_job_filter(batch_id=batch_id, tenant_id=tenant_id, **window))
    if as_json:
        _print_json({**summary.to_dict(), "economy": saved.to_dict()})
        return
    title = Text.assemble("per tier", *((" (batch ", _plain(batch), ")") if batch else ()),
                          *((" (tenant ", _plain(tenant), ")") if tenant else ()))
    console.print(_stats_table(summary, title=title, wide=wide))
    statuses = ", ".join(f"{k} {compact(v)}" for k, v in sorted(summary.by_status.items())) or "none"
    console.print(f"jobs: {compact(summary.jobs)} ({statuses})")
    console.print(cost_line(summary))
    if line := economy_line(saved):
        console.print(line)
    if summary.failure_reasons:
        console.print(failure_view(summary.failure_reasons, failed=summary.by_status.get("failed", 0)))
    console.print("cache hit rate: the share of all input tokens read from the cache; saved by caching: against "
                  "the same calls billing every cache token as plain input", style="dim")
    console.print("escalation rate: out of the jobs the tier worked; repeated calls: made by a repeated delivery "
                  "of a stage", style="dim")


# (label, the TierLine figure, its unit, shown only with --wide)
STATS_ROWS: tuple[tuple[str, str, Unit, bool], ...] = (
    ("jobs ended here", "jobs", "count", False),
    ("calls", "calls", "count", False),
    ("input tokens", "input_tokens", "count", False),
    ("output tokens", "output_tokens", "count", False),
    ("cache write tokens", "cache_creation_input_tokens", "count", True),
    ("cache read tokens", "cache_read_input_tokens", "count", True),
    ("cost", "cost_usd", "usd", False),
    ("cache hit rate", "cache_hit_rate", "pct", False),
    ("saved by caching", "cache_saving_usd", "usd", False),
    ("latency p50", "p50_latency_ms", "ms", False),
    ("latency p95", "p95_latency_ms", "ms", False),
    ("jobs worked", "worked", "count", True),
    ("jobs escalated", "escalations", "count", False),
    ("escalation rate", "escalation_rate", "pct", False),
    ("validations", "validations", "count", True),
    ("validations failed", "validation_failures", "count", False),
    ("validation failure rate", "validation_failure_rate", "pct", False),
    ("failed calls", "failed_calls", "count", False),
    ("repeated calls", "repeated_calls", "count", False),
    ("repeated calls' cost", "repeated_cost_usd", "usd", True),
    ("abandoned calls", "abandoned_calls", "count", False),
)


def _stats_table(summary: Summary, *, title: Text, wide: bool) -> Table:
    """The tiers as columns and the figures as rows: a column per tier fits 80 where a column per
    figure does not. The last column is over all tiers."""
    tiers = summary.tiers

    def total(attr: str) -> Any:
        return sum((getattr(t, attr) for t in tiers), Decimal(0) if attr.endswith("_usd") else 0)

    # Left blank where tiers do not add up: percentiles, and the jobs worked (an escalated job
    # was worked at two tiers). Verdicts belong to one tier each: their rates do add up.
    verdicts = total("validations")
    special: dict[str, str] = {
        "jobs": compact(summary.jobs), "cost_usd": compact(summary.cost_usd, "usd"), "p50_latency_ms": "",
        "p95_latency_ms": "", "worked": "", "escalation_rate": "",
        "validation_failure_rate": compact(total("validation_failures") / verdicts if verdicts else None, "pct"),
        "cache_hit_rate": compact(summary.cache_hit_rate, "pct"),
        "cache_saving_usd": compact(summary.cache_saving_usd, "usd")}
    cols = ("", *(t.tier for t in tiers), "total")
    table = new_table(cols, figures=cols[1:], title=title)
    for label, attr, unit, wide_only in STATS_ROWS:
        if wide_only and not wide:
            continue
        over_all = special[attr] if attr in special else compact(total(attr), unit)
        table.add_row(label, *(compact(getattr(t, attr), unit) for t in tiers),
                      Text(over_all, style="bold" if attr in ("jobs", "cost_usd") else ""))
    return table


@app.command()
def export(
    batch: Annotated[str, typer.Argument(help="Batch name (or id).")],
    format: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of standard output.")] = None,
    tenant: TenantOpt = None,
) -> None:
    """Stream a batch's results (key, status, tier, output, error, cost) in the order it was
    enqueued. In CSV the output cell is JSON unless it is a plain string."""
    if format not in ("jsonl", "csv"):
        raise InvalidQuery(f"unknown format {format!r}: expected jsonl or csv")
    with _session() as session:
        b = history.find_batch(db_session=session, batch=batch, tenant_id=_tenant_id(session, tenant))
        # A file replaces OUT only once the whole export is in it (pipeline/cli/outfile.py).
        fh: Output | TextIO
        with write_whole(out) if out is not None else nullcontext(sys.stdout) as fh:
            n = _write_results(fh, history.iter_results(db_session=session, batch_id=b.id), format)
    if out is not None:
        err.print(Text.assemble(f"wrote {n:,} result(s) of batch ", _plain(b.name), f" to {out}"))


def _write_results(fh: Output | TextIO, rows: Iterator[Any], format: str) -> int:
    n = 0
    if format == "jsonl":
        for r in rows:
            fh.write(json.dumps(history.jsonable(r), ensure_ascii=False) + "\n")
            n += 1
        return n
    writer = csv.writer(fh)
    writer.writerow(history.EXPORT_FIELDS)
    for r in rows:
        output = r.output if isinstance(r.output, str) or r.output is None else json.dumps(r.output, ensure_ascii=False)
        writer.writerow([r.key, r.status, r.tier or "", output or "", r.error or "", f"{r.cost_usd:f}"])
        n += 1
    return n
