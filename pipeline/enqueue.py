"""Taking a file of jobs into Postgres, the queue of record.

The file is read as a stream and written in multi-row inserts, so memory stays flat whatever its
size. Nothing is published to the broker here: the dispatcher feeds the stages from Postgres as
capacity frees up. A job's key is its idempotency key within the batch (``ON CONFLICT DO NOTHING``
on ``(batch_id, key)``), so re-running the same file adds nothing.

By default the whole file is checked before anything is written, so a bad line rejects the file
and loses nothing already accepted; ``skip_invalid`` keeps the good lines and reports the bad.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.errors import InputFileError, JobInputError
from pipeline.jobspec import JobSpec, digest, max_job_tokens, parse_job, parse_line
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


Progress = Callable[[int, int], None]  # (lines read, jobs accepted)


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


def iter_lines(path: Path, fmt: str, *, config: ModelConfig) -> Iterator[tuple[int, str, JobSpec | JobInputError]]:
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


def get_or_create_batch(session: Session, name: str) -> int:
    existing = session.scalar(select(Batch.id).where(Batch.name == name))
    if existing is not None:
        return existing
    stmt = _upsert(session, Batch).values(name=name, created_at=utcnow()).on_conflict_do_nothing()
    session.execute(stmt)
    return session.scalar(select(Batch.id).where(Batch.name == name))  # type: ignore[return-value]


def _upsert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    return insert(table)


def _write(session: Session, batch_id: int, chunk: list[tuple[int, JobSpec]]) -> tuple[int, list[tuple[int, JobSpec]]]:
    """Insert a chunk; return (new jobs, lines whose key the batch already has for a different job)."""
    now = utcnow()
    rows = [{"batch_id": batch_id, "key": s.key, "kind": s.kind, "payload": s.payload, "meta": s.metadata,
             "pinned_tier": s.tier, "status": JobStatus.QUEUED, "created_at": now, "updated_at": now}
            for _, s in chunk]
    # RETURNING names only the rows that were new: a key the batch already has returns nothing.
    stmt = _upsert(session, Job).on_conflict_do_nothing(index_elements=["batch_id", "key"]).returning(Job.key)
    new = set(session.scalars(stmt, rows).all())
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
) -> EnqueueReport:
    """Check, then write. Raises JobInputError for the first bad line unless ``skip_invalid``.

    Without ``skip_invalid`` the file is written in one transaction: a key that turns out, at
    write time, to clash with a different job (earlier in the file or already in the batch) rejects
    the whole file, and nothing of it is left behind. With ``skip_invalid`` each chunk commits as
    it goes and such lines are reported with the other bad ones."""
    fmt = detect_format(path, fmt)
    report = EnqueueReport(batch=batch)

    def bad(number: int, reason: str, raw: str) -> None:
        report.invalid_count += 1
        if len(report.invalid) < max_reported:
            report.invalid.append(BadLine(number, reason, raw[:2000]))

    if not skip_invalid:
        # Pass 1: check everything, write nothing. A 1M-line file is read twice rather than held.
        for number, _raw, item in iter_lines(path, fmt, config=config):
            if isinstance(item, JobInputError):
                raise JobInputError(item.reason, line=number, source=str(path))
    with session_factory() as session:
        batch_id = get_or_create_batch(session, batch)
        if skip_invalid:
            session.commit()
        report.batch_id = batch_id
        chunk: list[tuple[int, JobSpec]] = []
        raws: dict[int, str] = {}
        digests: dict[str, str] = {}

        def flush() -> None:
            if chunk:
                accepted, clashes = _write(session, batch_id, chunk)
                if clashes and not skip_invalid:
                    number, spec = clashes[0]
                    session.rollback()
                    raise JobInputError(_key_conflict(spec.key), line=number, source=str(path))
                report.accepted += accepted
                for number, spec in clashes:
                    bad(number, _key_conflict(spec.key), raws.get(number, ""))
                if skip_invalid:
                    session.commit()
                chunk.clear()
                raws.clear()
                digests.clear()
            if progress:
                progress(report.read, report.accepted)

        for number, raw, item in iter_lines(path, fmt, config=config):
            report.read += 1
            if isinstance(item, JobInputError):
                bad(number, item.reason, raw)
                continue
            if item.key in digests:
                # The same key twice in one chunk would make one multi-row insert conflict with
                # itself: the same job again is a duplicate; a different one is a mistake.
                if digests[item.key] != item.content_digest():
                    if not skip_invalid:
                        session.rollback()
                        raise JobInputError(_key_conflict(item.key), line=number, source=str(path))
                    bad(number, _key_conflict(item.key), raw)
                continue
            digests[item.key] = item.content_digest()
            chunk.append((number, item))
            raws[number] = raw[:2000]  # what a report keeps of a line, not the whole of a huge one
            if len(chunk) >= CHUNK:
                flush()
        flush()
        session.commit()
    valid = report.read - report.invalid_count
    report.duplicates = valid - report.accepted
    return report


def write_invalid_report(report: EnqueueReport, path: Path) -> None:
    with path.open("w") as fh:
        for bad in report.invalid:
            fh.write(json.dumps({"line": bad.line, "error": bad.reason, "input": bad.raw}) + "\n")
