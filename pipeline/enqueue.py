"""Taking a file of jobs into Postgres, the queue of record.

The file is read as a stream and written in multi-row inserts, so memory stays flat whatever its
size. Nothing is published to the broker here: the dispatcher feeds the stages from Postgres as
capacity frees up. A job's key is its idempotency key within the batch (``ON CONFLICT DO NOTHING``
on ``(batch_id, key)``), so re-running the same file adds nothing. The HTTP API sends the jobs of
a request body through the same ``enqueue_items`` (in one transaction).

By default the whole file is checked before anything is written, so a bad line rejects the file
and loses nothing already accepted; ``skip_invalid`` keeps the good lines and reports the bad.

CSV: the first row names the columns, which are the JSON Lines fields: ``key``, ``kind``, the
kind's text fields (``text``; ``instructions`` and ``context``; ``prompt``), ``labels``,
``schema``, ``tier`` and ``metadata``. An empty cell is a field left out, so one file can mix
kinds. ``schema`` and ``metadata`` cells hold JSON; ``labels`` holds a JSON array or
``billing|bug|other``. Every other cell is text, taken as it is. A column that is not a job field
rejects the file at its header. The line number of a row is the line its record starts on.

On Postgres each chunk is COPYed into a temporary table and moved into ``jobs`` by one
``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING id``: a VALUES list of 2,000 rows x 9
parameters is a statement the driver has to parse anew for every chunk, and took twice as long.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.errors import BatchCancelled, InputFileError, JobInputError
from pipeline.jobspec import JOB_FIELDS, JobSpec, digest, max_job_tokens, parse_job, parse_line
from pipeline.models import Batch, Job, JobKind, JobStatus, utcnow

CHUNK = 2000
FORMATS = ("jsonl", "csv")
# CSV cells that hold JSON rather than text.
_CSV_JSON = {"labels", "schema", "metadata"}


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

    phase: str  # "checking" (the first pass, default mode) or "writing"
    read: int  # lines (rows) read in this phase
    accepted: int  # new jobs written so far
    bytes_read: int
    bytes_total: int


Progress = Callable[[Tick], None]
InvalidSink = Callable[[BadLine], None]
Parsed = tuple[int, str, JobSpec | JobInputError]  # (line or index, raw text, job or its error)
# Yields the items to enqueue; called once per pass, keeping position[0] at the bytes read so far.
Source = Callable[[list[int]], Iterator[Parsed]]
# Called inside the writing transaction of an atomic enqueue, after the jobs are written and before
# the commit, with (session, batch id, new jobs). Raising rolls the whole enqueue back.
BeforeCommit = Callable[[Session, int, int], None]

CSV_COLUMNS = JOB_FIELDS


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputFileError(f"unknown format {fmt!r}: expected jsonl or csv")
        return fmt
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def _csv_row(row: dict[str, str | None]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, cell in row.items():
        if name is None or cell is None or cell == "":
            continue
        if name in _CSV_JSON:
            try:
                obj[name] = json.loads(cell)
            except json.JSONDecodeError:
                if name != "labels":
                    raise JobInputError(f"column {name!r} is not valid JSON") from None
                obj[name] = [x.strip() for x in cell.split("|") if x.strip()]
        else:
            obj[name] = cell
    return obj


def iter_lines(path: Path, fmt: str, *, config: ModelConfig,
               position: list[int] | None = None) -> Iterator[Parsed]:
    """Yield (line number, raw text, job or the error for that line), streaming. If given,
    ``position[0]`` is kept at the bytes read so far."""
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
                if not raw.strip():
                    continue
                try:
                    yield number, raw.decode("utf-8", "replace").rstrip("\n"), parse_line(
                        raw, work_tiers=tiers, max_tokens=max_tokens)
                except JobInputError as exc:
                    yield number, raw.decode("utf-8", "replace").rstrip("\n"), exc
        else:
            text = io.TextIOWrapper(fh, encoding="utf-8", errors="strict", newline="")
            try:
                reader = csv.DictReader(text)
                if not reader.fieldnames or "kind" not in reader.fieldnames:
                    raise InputFileError(f"{path}: a CSV file needs a header row with at least a 'kind' column")
                unknown = [c for c in reader.fieldnames if c not in CSV_COLUMNS]
                if unknown:
                    raise InputFileError(f"{path}, line 1: column(s) {', '.join(map(repr, unknown))} are not job "
                                         f"fields (expected some of {', '.join(sorted(CSV_COLUMNS))})")
                start = reader.line_num + 1
                for row in reader:
                    pos[0] = fh.tell()
                    number, start = start, reader.line_num + 1
                    if None in row:
                        yield number, json.dumps(row.pop(None)), JobInputError(
                            f"row has {len(reader.fieldnames) + 1}+ cells, the header names {len(reader.fieldnames)}")
                        continue
                    try:
                        yield number, json.dumps(row), parse_job(_csv_row(row), work_tiers=tiers,
                                                                 max_tokens=max_tokens)
                    except JobInputError as exc:
                        yield number, json.dumps(row), exc
            except UnicodeDecodeError as exc:
                raise InputFileError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
            except csv.Error as exc:
                raise InputFileError(f"{path}, line {reader.line_num}: malformed CSV: {exc}") from None


def iter_objects(numbered: Iterable[tuple[int, Any]], *, config: ModelConfig) -> Iterator[Parsed]:
    """Yield (number, raw text, job or the error for that item) for (number, decoded object)
    pairs, such as the jobs of an HTTP body with their index or line. An item that is already an
    error (it did not decode) passes through."""
    max_tokens = max_job_tokens(config)
    for number, obj in numbered:
        if isinstance(obj, JobInputError):
            yield number, "", obj
            continue
        try:
            yield number, "", parse_job(obj, work_tiers=config.work_tiers, max_tokens=max_tokens)
        except JobInputError as exc:
            yield number, "", exc


def get_or_create_batch(session: Session, name: str, *, tenant_id: int | None = None) -> int:
    """The id of the batch called ``name`` in a tenant's namespace (None: the operator's, for
    batches enqueued from the CLI), created if new."""
    scope = Batch.tenant_id.is_(None) if tenant_id is None else Batch.tenant_id == tenant_id
    existing = session.execute(select(Batch.id, Batch.cancelled_at).where(Batch.name == name, scope)).first()
    if existing is not None:
        if existing.cancelled_at is not None:
            # Jobs added now would be dispatched: a cancelled batch stays cancelled.
            raise BatchCancelled(f"batch {name!r} was cancelled at {existing.cancelled_at:%Y-%m-%d %H:%M:%S %Z}; "
                                 f"enqueue into a new batch name")
        return int(existing.id)
    stmt = _upsert(session, Batch).values(name=name, tenant_id=tenant_id, created_at=utcnow()).on_conflict_do_nothing()
    session.execute(stmt)
    return session.scalar(select(Batch.id).where(Batch.name == name, scope))  # type: ignore[return-value]


def _upsert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    return insert(table)


_PG_STAGE = text("""
    CREATE TEMP TABLE IF NOT EXISTS enqueue_stage (n int, key text, kind text, payload text, meta text, tier text)
    ON COMMIT DELETE ROWS
""")
_PG_INSERT = text("""
    INSERT INTO jobs (batch_id, key, kind, payload, metadata, pinned_tier, status, created_at, updated_at)
    SELECT :batch_id, key, kind, payload::jsonb, meta::jsonb, tier, 'queued', :now, :now
    FROM enqueue_stage ORDER BY n
    ON CONFLICT (batch_id, key) DO NOTHING
    RETURNING key
""")


def _write_pg(session: Session, batch_id: int, specs: list[JobSpec], now: datetime) -> set[str]:
    # COPY the chunk into a temporary table (the driver formats COPY rows in C), then move it into
    # jobs in one INSERT ... SELECT that skips keys the batch already has. The stage empties itself
    # at commit.
    session.execute(_PG_STAGE)
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor, cursor.copy("COPY enqueue_stage (n, key, kind, payload, meta, tier) FROM STDIN") as copy:
        for n, s in enumerate(specs):
            copy.write_row((n, s.key, s.kind.value, json.dumps(s.payload, ensure_ascii=False),
                            None if s.metadata is None else json.dumps(s.metadata, ensure_ascii=False), s.tier))
    new = set(session.scalars(_PG_INSERT, {"batch_id": batch_id, "now": now}).all())
    # Emptied here too, not only at commit: an atomic enqueue (the HTTP API) writes every chunk in
    # one transaction, and must not move the earlier chunks again with each later one.
    session.execute(text("TRUNCATE enqueue_stage"))
    return new


def _insert_new(session: Session, batch_id: int, specs: list[JobSpec]) -> set[str]:
    """Insert the chunk; return the keys that were new (RETURNING names only rows that did not
    conflict, so a key the batch already has returns nothing)."""
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":
        return _write_pg(session, batch_id, specs, now)
    rows = [{"batch_id": batch_id, "key": s.key, "kind": s.kind, "payload": s.payload, "meta": s.metadata,
             "pinned_tier": s.tier, "status": JobStatus.QUEUED, "created_at": now, "updated_at": now}
            for s in specs]
    stmt = _upsert(session, Job).on_conflict_do_nothing(index_elements=["batch_id", "key"]).returning(Job.key)
    return set(session.scalars(stmt, rows).all())


def _write(session: Session, batch_id: int, chunk: list[tuple[int, JobSpec]]) -> tuple[int, list[tuple[int, JobSpec]]]:
    """Insert a chunk; return (new jobs, items whose key the batch already has for a different job)."""
    new = _insert_new(session, batch_id, [s for _, s in chunk])
    seen = [(n, s) for n, s in chunk if s.key not in new]
    if not seen:
        return len(new), []
    # A key already there is an idempotent re-run only if it names the same job; the same key for
    # different content is the user's mistake, and silently keeping either one would hide it.
    existing = {
        r.key: digest({"kind": JobKind(r.kind).value, "payload": r.payload, "tier": r.pinned_tier,
                       "metadata": r.meta})
        for r in session.execute(select(Job.key, Job.kind, Job.payload, Job.meta, Job.pinned_tier)
                                 .where(Job.batch_id == batch_id, Job.key.in_([s.key for _, s in seen])))
    }
    return len(new), [(n, s) for n, s in seen if existing.get(s.key) != s.content_digest()]


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
    before_commit: BeforeCommit | None = None,
    progress: Progress | None = None,
    on_invalid: InvalidSink | None = None,
    max_reported: int = 1000,
    chunk_size: int = CHUNK,
    total_bytes: int = 0,
) -> EnqueueReport:
    """Check, then write: the one path by which jobs enter Postgres, from a file or an HTTP body.

    ``source`` is called once per pass. Raises JobInputError for the first bad item (``where`` and
    its number say where) unless ``skip_invalid``. A key that turns out, at write time, to clash
    with a different job (earlier in the input or already in the batch) is such a bad item too;
    without ``skip_invalid`` it rejects the whole input, which is why a file is then written
    ``atomic`` (see enqueue_file). With
    ``atomic`` everything, the batch row included, is one transaction and ``before_commit`` may
    still refuse it, so a refused enqueue leaves nothing behind; otherwise each chunk is committed
    as it is written, which suits files of any size.

    With ``skip_invalid`` every bad line goes to ``on_invalid`` as it is met (so a report of any
    size is written in bounded memory), and the first ``max_reported`` also to ``report.invalid``."""
    report = EnqueueReport(batch=batch)

    def tick(phase: str, read: int, pos: list[int]) -> None:
        if progress:
            progress(Tick(phase, read, report.accepted, pos[0], total_bytes))

    if not skip_invalid:
        # Pass 1: check everything, write nothing. A 1M-line file is read twice rather than held.
        first: tuple[int, JobInputError] | None = None
        bad = read = 0
        pos = [0]
        for number, _raw, item in source(pos):
            read += 1
            if isinstance(item, JobInputError):
                bad += 1
                first = first or (number, item)
            if read % chunk_size == 0:
                tick("checking", read, pos)
        tick("checking", read, pos)
        if first is not None:
            more = f" ({bad:,} bad lines in all)" if bad > 1 else ""
            raise JobInputError(first[1].reason + more, line=first[0], source=where)
    with session_factory() as session:
        batch_id = get_or_create_batch(session, batch, tenant_id=tenant_id)
        if not atomic:
            session.commit()
        report.batch_id = batch_id
        chunk: list[tuple[int, JobSpec]] = []
        raws: dict[int, str] = {}
        digests: dict[str, str] = {}
        pos = [0]

        def report_bad(number: int, reason: str, raw: str) -> None:
            report.invalid_count += 1
            bad_line = BadLine(number, reason, raw[:2000])
            if len(report.invalid) < max_reported:
                report.invalid.append(bad_line)
            if on_invalid:
                on_invalid(bad_line)

        def reject(number: int, key: str) -> None:
            session.rollback()
            raise JobInputError(_key_conflict(key), line=number, source=where)

        def flush() -> None:
            if chunk:
                accepted, clashes = _write(session, batch_id, chunk)
                if clashes and not skip_invalid:
                    reject(clashes[0][0], clashes[0][1].key)
                report.accepted += accepted
                for number, spec in clashes:
                    report_bad(number, _key_conflict(spec.key), raws.get(number, ""))
                if not atomic:
                    session.commit()
                chunk.clear()
                raws.clear()
                digests.clear()
            tick("writing", report.read, pos)

        for number, raw, item in source(pos):
            report.read += 1
            if isinstance(item, JobInputError):
                report_bad(number, item.reason, raw)
                continue
            if item.key in digests:
                # The same key twice in one chunk would make one multi-row insert conflict with
                # itself: the same job again is a duplicate; a different one is a mistake.
                if digests[item.key] != item.content_digest():
                    if not skip_invalid:
                        reject(number, item.key)
                    report_bad(number, _key_conflict(item.key), raw)
                continue
            digests[item.key] = item.content_digest()
            chunk.append((number, item))
            raws[number] = raw[:2000]  # what a report keeps of a line, not the whole of a huge one
            if len(chunk) >= chunk_size:
                flush()
        flush()
        if before_commit is not None:
            before_commit(session, batch_id, report.accepted)
        session.commit()
    valid = report.read - report.invalid_count
    report.duplicates = valid - report.accepted
    return report


def enqueue_file(
    session_factory: Callable[[], Session],
    path: Path,
    *,
    batch: str,
    config: ModelConfig,
    fmt: str | None = None,
    skip_invalid: bool = False,
    progress: Progress | None = None,
    on_invalid: InvalidSink | None = None,
    max_reported: int = 1000,
    chunk_size: int = CHUNK,
) -> EnqueueReport:
    """Check, then write. Raises JobInputError for the first bad line unless ``skip_invalid``.

    Without ``skip_invalid`` the file is written in one transaction, so a line rejected at write
    time (a key reused for a different job) leaves nothing of the file behind. With it, each chunk
    commits as it goes; every bad line goes to ``on_invalid`` as it is met (so a report of any
    size is written in bounded memory), and the first ``max_reported`` also to ``report.invalid``."""
    fmt = detect_format(path, fmt)
    try:
        total = path.stat().st_size
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}") from None
    return enqueue_items(
        session_factory, lambda pos: iter_lines(path, fmt, config=config, position=pos), batch=batch,
        where=str(path), skip_invalid=skip_invalid, atomic=not skip_invalid, progress=progress,
        on_invalid=on_invalid, max_reported=max_reported, chunk_size=chunk_size, total_bytes=total)


def invalid_line_json(bad: BadLine) -> str:
    """One line of a --skip-invalid report: JSON with the line number, the reason and the input."""
    return json.dumps({"line": bad.line, "error": bad.reason, "input": bad.raw}, ensure_ascii=False)


def write_invalid_report(report: EnqueueReport, path: Path) -> None:
    with path.open("w") as fh:
        for bad in report.invalid:
            fh.write(invalid_line_json(bad) + "\n")
