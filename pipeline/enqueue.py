"""Taking a file of jobs into Postgres, the queue of record.

The file is read as a stream and written in multi-row inserts, so memory stays flat whatever its
size. Nothing is published to the broker here: the dispatcher feeds the stages from Postgres as
capacity frees up. A job's key is its idempotency key within the batch (``ON CONFLICT DO NOTHING``
on ``(batch_id, key)``), so re-running the same file adds nothing.

By default the whole file is checked before anything is written, so a bad line rejects the file
and loses nothing already accepted; ``skip_invalid`` keeps the good lines and reports the bad.
The HTTP API sends the items of a request body through the same ``enqueue_items``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.errors import InputFileError, JobInputError
from pipeline.jobspec import PROMPT_OVERHEAD_TOKENS, JobSpec, parse_job, parse_line
from pipeline.models import Batch, Job, JobStatus, utcnow

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


Progress = Callable[[int, int], None]  # (lines read, jobs accepted)
Parsed = tuple[int, str, JobSpec | JobInputError]  # (line or index, raw text, job or its error)


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


def max_job_tokens(config: ModelConfig) -> int:
    return min(t.context_tokens for t in config.tiers.values()) - PROMPT_OVERHEAD_TOKENS


def iter_lines(path: Path, fmt: str, *, config: ModelConfig) -> Iterator[Parsed]:
    """Yield (line number, raw text, job or the error for that line), streaming."""
    max_tokens = max_job_tokens(config)
    tiers = config.work_tiers
    try:
        fh: IO[bytes] = path.open("rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        if fmt == "jsonl":
            for number, raw in enumerate(fh, start=1):
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
                for row in reader:
                    number = reader.line_num
                    try:
                        yield number, json.dumps(row), parse_job(_csv_row(row), work_tiers=tiers,
                                                                 max_tokens=max_tokens)
                    except JobInputError as exc:
                        yield number, json.dumps(row), exc
            except UnicodeDecodeError as exc:
                raise InputFileError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
            except csv.Error as exc:
                raise InputFileError(f"{path}: malformed CSV: {exc}") from None


def get_or_create_batch(session: Session, name: str, *, tenant_id: int | None = None) -> int:
    """The id of the tenant's batch called ``name``, created if new. ``tenant_id`` None is the
    operator's own namespace (batches enqueued from the CLI)."""
    where = (Batch.name == name, Batch.tenant_id.is_(None) if tenant_id is None else Batch.tenant_id == tenant_id)
    existing = session.scalar(select(Batch.id).where(*where))
    if existing is not None:
        return existing
    stmt = _upsert(session, Batch).values(name=name, tenant_id=tenant_id, created_at=utcnow()).on_conflict_do_nothing()
    session.execute(stmt)
    return session.scalar(select(Batch.id).where(*where))  # type: ignore[return-value]


def _upsert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    return insert(table)


def _write(session: Session, batch_id: int, specs: list[JobSpec]) -> int:
    now = utcnow()
    rows = [{"batch_id": batch_id, "key": s.key, "kind": s.kind, "payload": s.payload, "meta": s.metadata,
             "pinned_tier": s.tier, "status": JobStatus.QUEUED, "created_at": now, "updated_at": now}
            for s in specs]
    # RETURNING counts only the rows that were new: a key the batch already has returns nothing.
    stmt = _upsert(session, Job).on_conflict_do_nothing(index_elements=["batch_id", "key"]).returning(Job.id)
    return len(session.execute(stmt, rows).all())


def iter_objects(numbered: Iterable[tuple[int, Any]], *, config: ModelConfig) -> Iterator[Parsed]:
    """Yield (number, raw text, job or the error for that item) for (number, decoded object)
    pairs, such as the items of an HTTP body with their index or line. An item that is already an
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


# Called inside the writing transaction, after the jobs are written and before the commit, with
# (session, batch id, jobs written so far). Raising rolls the whole submission back.
BeforeCommit = Callable[[Session, int, int], None]


def enqueue_items(
    session_factory: Callable[[], Session],
    source: Callable[[], Iterator[Parsed]],
    *,
    batch: str,
    tenant_id: int | None = None,
    where: str | None = None,
    skip_invalid: bool = False,
    atomic: bool = False,
    before_commit: BeforeCommit | None = None,
    progress: Progress | None = None,
    max_reported: int = 1000,
) -> EnqueueReport:
    """Check, then write: the one path by which jobs enter Postgres, from a file or an HTTP body.

    ``source`` is called once per pass and yields (line or index, raw text, job or error). Raises
    JobInputError for the first bad item unless ``skip_invalid``. With ``atomic``, everything
    (the batch row included) is one transaction, so a refused submission leaves nothing behind;
    otherwise each chunk is committed as it is written, which suits files of any size.
    """
    report = EnqueueReport(batch=batch)

    if not skip_invalid:
        # Pass 1: check everything, write nothing. A 1M-line file is read twice rather than held.
        for number, _raw, item in source():
            if isinstance(item, JobInputError):
                raise JobInputError(item.reason, line=number, source=where)
    with session_factory() as session:
        batch_id = get_or_create_batch(session, batch, tenant_id=tenant_id)
        if not atomic:
            session.commit()
        report.batch_id = batch_id
        chunk: list[JobSpec] = []
        keys: set[str] = set()

        def flush() -> None:
            if chunk:
                report.accepted += _write(session, batch_id, chunk)
                if not atomic:
                    session.commit()
                chunk.clear()
                keys.clear()
            if progress:
                progress(report.read, report.accepted)

        for number, raw, item in source():
            report.read += 1
            if isinstance(item, JobInputError):
                report.invalid_count += 1
                if len(report.invalid) < max_reported:
                    report.invalid.append(BadLine(number, item.reason, raw[:2000]))
                continue
            if item.key in keys:
                # The same key twice in one chunk would make one multi-row insert conflict with
                # itself; the first occurrence wins, as it would across chunks.
                continue
            keys.add(item.key)
            chunk.append(item)
            if len(chunk) >= CHUNK:
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
    max_reported: int = 1000,
    tenant_id: int | None = None,
) -> EnqueueReport:
    """Check, then write. Raises JobInputError for the first bad line unless ``skip_invalid``."""
    fmt = detect_format(path, fmt)
    return enqueue_items(session_factory, lambda: iter_lines(path, fmt, config=config), batch=batch,
                         tenant_id=tenant_id, where=str(path), skip_invalid=skip_invalid, progress=progress,
                         max_reported=max_reported)


def write_invalid_report(report: EnqueueReport, path: Path) -> None:
    with path.open("w") as fh:
        for bad in report.invalid:
            fh.write(json.dumps({"line": bad.line, "error": bad.reason, "input": bad.raw}) + "\n")
