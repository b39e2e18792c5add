"""Taking a file of jobs into Postgres, the queue of record.

The file is read as a stream, checked line by line and written as it is read, so memory stays
flat whatever its size. It is read once, unless a new batch's file repeats a key (it is then read
and written again, each key checked against the batch: pipeline.intake.write) or Postgres aborts
the enqueue to break a deadlock (it is then run again from the start, a few times:
db.retry_conflicts). Nothing is published to the broker here: the dispatcher feeds the stages from
Postgres as capacity frees up. A job's key is its idempotency key within the batch (``ON CONFLICT
DO NOTHING`` on ``(batch_id, key)``), so re-running the same file adds nothing. The HTTP API sends
the jobs of a request body through the same ``enqueue_items`` (in one transaction), and every
enqueue for a tenant, from the API or `switchyard enqueue --tenant`, passes that tenant's limits
there (``tenants.admit``). How rows reach ``jobs`` (one COPY for a new batch, staged chunks
otherwise, plain inserts on SQLite) is pipeline.intake.write's business.

By default a bad line rejects the whole file and loses nothing already accepted: the file is
written in one transaction, rolled back at the first bad line (the rest is still read, to count
the bad lines). The first chunk is checked before the database is touched at all, so a small bad
input costs nothing there. ``skip_invalid`` keeps the good lines, committing chunk by chunk, and
reports the bad.

CSV: the first row names the columns, which are the JSON Lines fields: ``key``, ``kind``, the
kind's text fields (``text``; ``instructions`` and ``context``; ``prompt``), ``labels``,
``schema``, ``tier``, ``metadata``, ``task`` and ``task_version``. An empty cell is a field left
out, so one file can mix kinds, and jobs with and without a task. ``schema`` and ``metadata``
cells hold JSON; ``labels`` holds a JSON array or ``billing|bug|other``; ``task_version`` a whole
number. Every other cell is text, taken as it is. A column that is not a job field,
or one named twice, rejects the file at its header. The line number of a row is the line its
record starts on. A record the csv module refuses (read strictly: a quote never closed, text after
a closing quote) is a bad line naming its column.

An input with no jobs is refused and makes no batch. A UTF-8 byte-order mark opening a file is
skipped.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, NoReturn

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipeline import tenants
from pipeline.config import ModelConfig, check_rate
from pipeline.db import insert_or_skip, retry_conflicts
from pipeline.errors import BatchCancelled, InputFileError, InvalidInput, JobInputError
from pipeline.flow import budgets
from pipeline.flow.admission import check_priority
from pipeline.intake import tasks
from pipeline.intake.jobspec import (
    CHARS_PER_TOKEN,
    JOB_FIELDS,
    JobSpec,
    TaskLookup,
    json_limits,
    max_job_tokens,
    parse_job,
    parse_line,
)
from pipeline.intake.write import KeyRepeated, Writer, open_writer
from pipeline.models import Batch, utcnow
from pipeline.names import check_batch_name

# A batch's modes (pipeline.flow.economy): its model calls made synchronously, or in message batches.
MODES = ("standard", "economy")

# Lines per chunk: what a progress tick, a --skip-invalid commit and a staged INSERT ... SELECT
# cover, and what is held before the database is first touched.
CHUNK = 5000
FORMATS = ("jsonl", "csv")
# CSV cells that hold JSON rather than text.
_CSV_JSON = {"labels", "schema", "metadata"}
_CSV_FIELD_LIMIT = 128 * 1024  # the csv module's default
# What an undecodable byte becomes under errors="surrogateescape".
_SURROGATE = re.compile(r"[\udc80-\udcff]")


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str
    raw: str


@dataclass
class EnqueueReport:
    batch: str
    batch_id: int | None = None
    read: int = 0
    accepted: int = 0  # new jobs written
    duplicates: int = 0  # lines whose key the batch already had
    invalid: list[BadLine] = field(default_factory=list)
    invalid_count: int = 0


@dataclass(frozen=True)
class Tick:
    """Where an enqueue has got to, for a progress bar."""

    # "writing"; "rewriting" when a new batch's file repeats a key and is written again, checking
    # each key against the batch; "checking" once a bad line has rejected the input (read on to
    # count the bad lines, writing nothing).
    phase: str
    read: int  # lines (rows) read in this pass
    accepted: int  # new jobs written so far
    bytes_read: int
    bytes_total: int


Progress = Callable[[Tick], None]
InvalidSink = Callable[[BadLine], None]
Parsed = tuple[int, str, JobSpec | JobInputError]  # (line or index, raw text, job or its error)
# Yields the items to enqueue, keeping position[0] at the bytes read so far. Called once, or again
# if a new batch's input repeats a key (see pipeline.intake.write).
Source = Callable[[list[int]], Iterator[Parsed]]

CSV_COLUMNS = JOB_FIELDS


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputFileError(f"unknown format {fmt!r}: expected jsonl or csv")
        return fmt
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def _csv_row(header: list[str], cells: list[str]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, cell in zip(header, cells, strict=False):  # a short row: the missing cells are left out
        if cell == "":
            continue
        if name == "task_version":
            # A number, as in JSON Lines; anything else is left for the job check to name.
            digits = cell.strip()
            obj[name] = int(digits) if digits.isascii() and digits.isdigit() else cell
        elif name in _CSV_JSON:
            try:
                with json_limits():
                    obj[name] = json.loads(cell)
            except json.JSONDecodeError:
                if name != "labels":
                    raise JobInputError(f"column {name!r} is not valid JSON") from None
                obj[name] = [x.strip() for x in cell.split("|") if x.strip()]
            except JobInputError as exc:
                raise JobInputError(f"column {name!r}: {exc}") from None
        else:
            obj[name] = cell
    return obj


def iter_lines(path: Path, fmt: str, *, config: ModelConfig, position: list[int] | None = None,
               tasks: TaskLookup | None = None) -> Iterator[Parsed]:
    """Yield (line number, raw text, job or the error for that line), streaming. If given,
    ``position[0]`` is kept at the bytes read so far. A UTF-8 byte-order mark at the start of
    the file is skipped."""
    max_tokens = max_job_tokens(config)
    tiers = config.work_tiers
    pos = position if position is not None else [0]
    try:
        fh: IO[bytes] = path.open("rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        if fmt == "jsonl":
            for number, raw in enumerate(fh, start=1):
                pos[0] += len(raw)
                if number == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip():
                    continue
                try:
                    yield number, raw.decode("utf-8", "replace").rstrip("\n"), parse_line(
                        raw, work_tiers=tiers, max_tokens=max_tokens, tasks=tasks)
                except JobInputError as exc:
                    yield number, raw.decode("utf-8", "replace").rstrip("\n"), exc
        else:
            yield from _csv_rows(path, fh, pos, tiers=tiers, max_tokens=max_tokens, tasks=tasks)


def _csv_rows(path: Path, fh: IO[bytes], pos: list[int], *, tiers: tuple[str, ...],
              max_tokens: int, tasks: TaskLookup | None) -> Iterator[Parsed]:
    """The CSV half of iter_lines. Read strictly: a record the csv module refuses (text after a
    closing quote, a quote never closed) is a bad line naming its column, like a job found bad, and
    so is one holding bytes that are not UTF-8 (decoded as lone surrogates, which no valid
    UTF-8 gives, and found in the cells)."""
    # A cell longer than any job could hold is refused as one; below that, a long text is taken, as
    # in JSON Lines (the csv module's own default stops at 128 KiB).
    limit = max(_CSV_FIELD_LIMIT, math.ceil(max_tokens * CHARS_PER_TOKEN) + 1)
    csv.field_size_limit(limit)
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
    record: list[str] = []  # the lines of the record being read, for naming what is wrong with it

    def lines() -> Iterator[str]:
        for line in text:
            record.append(line)
            yield line

    reader = csv.reader(lines(), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputFileError(f"{path}, line 1: the header row is not valid CSV: {exc}") from None
    if header is None:
        return  # an empty file: no jobs
    _check_header(path, header, "".join(record))
    record.clear()
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader, None)
        except csv.Error as exc:
            raw = _as_read("".join(record))
            if str(exc).startswith("field larger than field limit"):
                cell, _ = _csv_fault(raw)
                # The reader cannot find where the next record starts: the file cannot be read on.
                raise InputFileError(f"{path}, line {start}: {_column(header, cell)} holds more than {limit:,} "
                                     f"characters, more than a job can (a quote left open would do this)") from None
            cell, fault = _csv_fault(raw)
            yield start, raw, JobInputError(f"{_column(header, cell)}: {fault}" if fault else f"malformed CSV: {exc}")
            record.clear()
            start = reader.line_num + 1
            continue
        if cells is None:
            return
        pos[0] = fh.tell()
        number, start = start, reader.line_num + 1
        raw = _as_read("".join(record))
        record.clear()
        if not cells:
            continue  # a blank line
        if len(cells) > len(header):
            yield number, json.dumps(cells), JobInputError(
                f"row has {len(cells)} cells, the header names {len(header)}")
            continue
        bad = next((i for i, cell in enumerate(cells) if _SURROGATE.search(cell)), None)
        if bad is not None:
            yield number, raw, JobInputError(f"not valid UTF-8 ({_column(header, bad)})")
            continue
        row = dict(zip(header, cells, strict=False))
        try:
            yield number, json.dumps(row), parse_job(_csv_row(header, cells), work_tiers=tiers, max_tokens=max_tokens,
                                                     tasks=tasks)
        except JobInputError as exc:
            yield number, json.dumps(row), exc


def _as_read(record: str) -> str:
    """A record's text as a report shows it: bytes that are not UTF-8 as U+FFFD, as in JSON Lines."""
    return record.encode("utf-8", "surrogateescape").decode("utf-8", "replace").rstrip("\r\n")


def _check_header(path: Path, header: list[str], raw: str) -> None:
    if _SURROGATE.search(raw):
        raise InputFileError(f"{path}, line 1: the header row is not valid UTF-8")
    if "kind" not in header and "task" not in header:
        # A job under a task takes its kind from the task.
        raise InputFileError(f"{path}: a CSV file needs a header row with at least a 'kind' or a 'task' column")
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if unknown:
        raise InputFileError(f"{path}, line 1: column(s) {', '.join(map(repr, unknown))} are not job "
                             f"fields (expected some of {', '.join(sorted(CSV_COLUMNS))})")
    seen: dict[str, int] = {}
    for i, name in enumerate(header):
        if name in seen:
            raise InputFileError(f"{path}, line 1: column {name!r} appears twice in the header "
                                 f"(columns {seen[name] + 1} and {i + 1})")
        seen[name] = i


def _column(header: list[str], index: int) -> str:
    return f"column {header[index]!r}" if index < len(header) else f"cell {index + 1} (past the header's columns)"


def _csv_fault(record: str) -> tuple[int, str | None]:
    """Which cell of a record the csv module refused, and what is wrong there: it says neither.
    The record's text is walked as the module reads it (a quote opens a quoted cell only where the
    cell begins; "" inside one is a quote)."""
    cell, at_start, quoted, i = 0, True, False, 0
    while i < len(record):
        c = record[i]
        if quoted:
            if c == '"':
                if record.startswith('"', i + 1):
                    i += 1
                else:
                    quoted = False
                    if i + 1 < len(record) and record[i + 1] not in ",\r\n":
                        return cell, "text after the closing quote of a quoted cell"
        elif c == '"' and at_start:
            quoted = True
        elif c == ",":
            cell += 1
            at_start = True
            i += 1
            continue
        at_start = False
        i += 1
    if quoted:
        return cell, "a quoted cell is not closed before the end of the file"
    return cell, None


def iter_objects(numbered: Iterable[tuple[int, Any]], *, config: ModelConfig,
                 tasks: TaskLookup | None = None) -> Iterator[Parsed]:
    """Yield (number, raw text, job or the error for that item) for (number, decoded object)
    pairs, such as the jobs of an HTTP body with their index or line. An item that is already an
    error (it did not decode) passes through."""
    max_tokens = max_job_tokens(config)
    for number, obj in numbered:
        if isinstance(obj, JobInputError):
            yield number, "", obj
            continue
        try:
            yield number, "", parse_job(obj, work_tiers=config.work_tiers, max_tokens=max_tokens, tasks=tasks)
        except JobInputError as exc:
            yield number, "", exc


def get_or_create_batch(session: Session, name: str, *, tenant_id: int | None = None,
                        shadow_rate: float | None = None, priority: int | None = None,
                        task_ids: Collection[int] = (), mode: str | None = None,
                        budget_usd: Decimal | None = None) -> int:
    """The id of the batch called ``name`` in a tenant's namespace (None: the operator's, for
    batches enqueued from the CLI), created if new. ``shadow_rate``, if given, becomes the batch's
    (pipeline.flow.shadow): for a batch that exists, from its next job to succeed on. So does
    ``priority`` (pipeline.flow.admission), from the dispatcher's next round; a new batch without
    one takes the highest a task of ``task_ids`` (its first jobs') sets, else the default."""
    scope = Batch.tenant_id.is_(None) if tenant_id is None else Batch.tenant_id == tenant_id
    existing = session.execute(select(Batch.id, Batch.cancelled_at).where(Batch.name == name, scope)).first()
    given = {k: v for k, v in (("shadow_rate", shadow_rate), ("priority", priority), ("mode", mode))
             if v is not None}
    if existing is not None:
        if existing.cancelled_at is not None:
            # Jobs added now would be dispatched: a cancelled batch stays cancelled.
            raise BatchCancelled(f"batch {name!r} was cancelled at {existing.cancelled_at:%Y-%m-%d %H:%M:%S %Z}; "
                                 f"enqueue into a new batch name")
        if given:
            session.execute(update(Batch).where(Batch.id == existing.id).values(**given))
        if budget_usd is not None:
            budgets.set_budget(session, int(existing.id), budget_usd)
        return int(existing.id)
    if priority is None:
        priority = tasks.default_priority(session, task_ids)
    session.execute(insert_or_skip(session, Batch).values(name=name, tenant_id=tenant_id, created_at=utcnow(),
                                                          shadow_rate=shadow_rate, priority=priority, mode=mode)
                    .on_conflict_do_nothing())
    batch_id: int = session.scalar(select(Batch.id).where(Batch.name == name, scope))  # type: ignore[assignment]
    if given:  # a concurrent enqueue made it first
        session.execute(update(Batch).where(Batch.id == batch_id).values(**given))
    if budget_usd is not None:  # set before the batch's first job is written, so every call reserves
        budgets.set_budget(session, batch_id, budget_usd)
    return batch_id


def _key_conflict(key: str) -> str:
    return f"key {key!r} was already used in this batch for a different job"


def enqueue_items(
    session_factory: Callable[[], Session],
    source: Source,
    *,
    batch: str,
    tenant_id: int | None = None,
    where: str | None = None,
    skip_invalid: bool = False,
    atomic: bool = False,
    progress: Progress | None = None,
    on_invalid: InvalidSink | None = None,
    max_reported: int = 1000,
    chunk_size: int = CHUNK,
    total_bytes: int = 0,
    shadow_rate: float | None = None,
    priority: int | None = None,
    mode: str | None = None,
    budget_usd: Decimal | None = None,
) -> EnqueueReport:
    """Check and write: the one path by which jobs enter Postgres, from a file or an HTTP body.

    Raises JobInputError for the first bad item (``where`` and its number say where) unless
    ``skip_invalid``. A key that turns out, at write time, to clash with a different job (earlier
    in the input or already in the batch) is such a bad item too. Without ``skip_invalid`` a bad
    item rejects the whole input, so it must then be written ``atomic`` (see enqueue_file). With
    ``atomic`` everything, the batch row included, is one transaction, so a refused enqueue leaves
    nothing behind; otherwise each chunk is committed as it is written, which suits files of any
    size.

    With ``tenant_id`` the jobs go to that tenant's batch of this name, and only if the tenant's
    limits take them (``tenants.admit``, after they are written and before the commit: it raises
    LimitExceeded). That needs ``atomic``: a limit is checked against the whole input, and a refused
    one must leave nothing behind, not the chunks committed before it.

    With ``skip_invalid`` every bad line goes to ``on_invalid`` as it is met (so a report of any
    size is written in bounded memory), and the first ``max_reported`` also to ``report.invalid``.

    An atomic enqueue that Postgres aborts to break a deadlock with a concurrent one (two
    submissions to one batch writing the same keys in different orders, say) is run again from
    the start, a few times (db.retry_conflicts): nothing of it was kept. One committed chunk by
    chunk is not, since what it committed would count as duplicates the second time; nor is an
    atomic one with ``skip_invalid``, whose bad items went to ``on_invalid`` already.

    A batch is made only for a job: an input with no items is refused (InputFileError), and one
    whose every item is bad (``skip_invalid``) returns a report whose ``batch_id`` is None.
    ``batch`` must pass check_batch_name. ``shadow_rate``: the batch's share of jobs shadowed
    (get_or_create_batch), in [0, 1]; ``priority``: the batch's, 0-9 (pipeline.flow.admission)."""
    check_batch_name(batch)
    if mode is not None and mode not in MODES:
        raise InvalidInput(f"the mode must be one of {', '.join(MODES)}, not {mode!r}")
    if shadow_rate is not None and check_rate(shadow_rate) is None:
        raise InvalidInput(f"the shadow rate must be a number from 0 to 1, not {shadow_rate!r}")
    if priority is not None:
        check_priority(priority)
    if tenant_id is not None and not atomic:
        raise ValueError("an enqueue for a tenant must be atomic: its limits are checked against all of it")

    def attempt() -> EnqueueReport:
        with session_factory() as session:
            # One COPY for the whole input needs the input in one transaction, and that only a bad
            # line may end (a key clash can't happen in an empty batch, and a repeat starts over).
            copy = atomic and not skip_invalid
            try:
                report = _enqueue_pass(session, source, batch=batch, tenant_id=tenant_id, where=where,
                                       atomic=atomic, skip_invalid=skip_invalid, copy=copy, phase="writing",
                                       progress=progress, on_invalid=on_invalid, max_reported=max_reported,
                                       chunk_size=chunk_size, total_bytes=total_bytes, shadow_rate=shadow_rate,
                                       priority=priority, mode=mode, budget_usd=budget_usd)
            except KeyRepeated:
                session.rollback()
                report = _enqueue_pass(session, source, batch=batch, tenant_id=tenant_id, where=where,
                                       atomic=atomic, skip_invalid=skip_invalid, copy=False, phase="rewriting",
                                       progress=progress, on_invalid=on_invalid, max_reported=max_reported,
                                       chunk_size=chunk_size, total_bytes=total_bytes, shadow_rate=shadow_rate,
                                       priority=priority, mode=mode, budget_usd=budget_usd)
            if report.read == 0:
                raise InputFileError(f"{where or 'the request body'} has no jobs: nothing was enqueued")
            if tenant_id is not None and report.batch_id is not None:
                tenants.admit(session, tenant_id, batch_id=report.batch_id, new_jobs=report.accepted)
            session.commit()
        return report

    retry = atomic and not skip_invalid
    report = retry_conflicts(attempt, what=f"enqueue into batch {batch!r}") if retry else attempt()
    valid = report.read - report.invalid_count
    report.duplicates = valid - report.accepted
    return report


def _enqueue_pass(session: Session, source: Source, *, batch: str, tenant_id: int | None, where: str | None,
                  atomic: bool, skip_invalid: bool, copy: bool, phase: str, progress: Progress | None,
                  on_invalid: InvalidSink | None, max_reported: int, chunk_size: int,
                  total_bytes: int, shadow_rate: float | None = None, priority: int | None = None,
                  mode: str | None = None, budget_usd: Decimal | None = None) -> EnqueueReport:
    """One reading of the input, writing as it goes; the caller commits the last of it."""
    report = EnqueueReport(batch=batch)
    pos = [0]
    held: list[tuple[int, JobSpec]] = []  # the first chunk, until it is complete
    raws: dict[int, str] = {}  # this chunk's lines, for the report of a clash (skip_invalid only)
    pending = 0  # items given to the writer since its last flush

    def tick(what: str) -> None:
        if progress:
            progress(Tick(what, report.read, report.accepted, pos[0], total_bytes))

    def report_bad(number: int, reason: str, raw: str) -> None:
        report.invalid_count += 1
        bad_line = BadLine(number, reason, raw[:2000])
        if len(report.invalid) < max_reported:
            report.invalid.append(bad_line)
        if on_invalid:
            on_invalid(bad_line)

    with ExitStack() as stack:
        writer: Writer | None = None

        def start() -> Writer:
            batch_id = get_or_create_batch(session, batch, tenant_id=tenant_id, shadow_rate=shadow_rate,
                                           priority=priority, mode=mode, budget_usd=budget_usd,
                                           task_ids={spec.task_id for _, spec in held if spec.task_id is not None})
            if not atomic:
                session.commit()
            report.batch_id = batch_id
            w = stack.enter_context(open_writer(session, batch_id, copy=copy))
            for number, spec in held:
                w.add(number, spec)
            held.clear()
            return w

        def flush(w: Writer) -> None:
            written = w.flush()
            if written.clashes and not skip_invalid:
                number, key = written.clashes[0]
                session.rollback()
                raise JobInputError(_key_conflict(key), line=number, source=where)
            report.accepted += written.new
            for number, key in written.clashes:
                report_bad(number, _key_conflict(key), raws.get(number, ""))
            if not atomic:
                session.commit()
            raws.clear()
            tick(phase)

        items = source(pos)
        for number, raw, item in items:
            report.read += 1
            if isinstance(item, JobInputError):
                if not skip_invalid:
                    if writer is not None:
                        writer.abort()
                    session.rollback()
                    _reject(items, report, first=(number, item), where=where, tick=tick)
                report_bad(number, item.reason, raw)
                continue
            if skip_invalid:
                raws[number] = raw[:2000]  # what a report keeps of a line, not the whole of a huge one
            if writer is None:
                held.append((number, item))
                if len(held) >= chunk_size:
                    writer = start()
                    flush(writer)
                continue
            writer.add(number, item)
            pending += 1
            if pending >= chunk_size:
                pending = 0
                flush(writer)
        if writer is None:
            if not held:
                return report  # not one valid job: no batch is made for nothing
            writer = start()
        flush(writer)
        writer.close()
    return report


def _reject(items: Iterator[Parsed], report: EnqueueReport, *, first: tuple[int, JobInputError], where: str | None,
            tick: Callable[[str], None]) -> NoReturn:
    """Read on only to count the bad lines, then raise for the first."""
    bad = 1
    for _number, _raw, item in items:
        report.read += 1
        if isinstance(item, JobInputError):
            bad += 1
        if report.read % CHUNK == 0:
            tick("checking")
    tick("checking")
    more = f" ({bad:,} bad lines in all)" if bad > 1 else ""
    raise JobInputError(first[1].reason + more, line=first[0], source=where)


def input_size(path: Path) -> int:
    """The input file's size in bytes; InputFileError if it cannot be read."""
    try:
        return path.stat().st_size
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}") from None


def enqueue_file(
    session_factory: Callable[[], Session],
    path: Path,
    *,
    batch: str,
    config: ModelConfig,
    tenant_id: int | None = None,
    fmt: str | None = None,
    skip_invalid: bool = False,
    progress: Progress | None = None,
    on_invalid: InvalidSink | None = None,
    max_reported: int = 1000,
    chunk_size: int = CHUNK,
    shadow_rate: float | None = None,
    priority: int | None = None,
    mode: str | None = None,
    budget_usd: Decimal | None = None,
) -> EnqueueReport:
    """Check and write. Raises JobInputError for the first bad line unless ``skip_invalid``.

    Without ``skip_invalid`` the file is written in one transaction, so a bad line, or one rejected
    at write time (a key reused for a different job), leaves nothing of the file behind. With it, each chunk
    commits as it goes; every bad line goes to ``on_invalid`` as it is met (so a report of any
    size is written in bounded memory), and the first ``max_reported`` also to ``report.invalid``.

    With ``tenant_id``, into that tenant's batch under its limits, as an API submission is: in one
    transaction, ``skip_invalid`` or not, so a refused file leaves nothing behind."""
    fmt = detect_format(path, fmt)
    total = input_size(path)
    # Each task a line names is looked up once for the whole file (and kept across a second reading).
    named = tasks.lookup(session_factory, tenant_id=tenant_id)
    return enqueue_items(
        session_factory, lambda pos: iter_lines(path, fmt, config=config, position=pos, tasks=named), batch=batch,
        tenant_id=tenant_id, where=str(path), skip_invalid=skip_invalid,
        atomic=not skip_invalid or tenant_id is not None, progress=progress,
        on_invalid=on_invalid, max_reported=max_reported, chunk_size=chunk_size, total_bytes=total,
        shadow_rate=shadow_rate, priority=priority, mode=mode, budget_usd=budget_usd)


def invalid_line_json(bad: BadLine) -> str:
    """One line of a --skip-invalid report: JSON with the line number, the reason and the input."""
    return json.dumps({"line": bad.line, "error": bad.reason, "input": bad.raw}, ensure_ascii=False)
