"""Writing checked jobs into ``jobs``: three writers, and when each is used.

``CopyWriter`` (Postgres, a batch with no jobs yet, the whole input in one transaction): one COPY
straight into ``jobs``, fed as each line is checked, so Postgres inserts and indexes the rows on
its own core while Python reads the next ones. Nothing can conflict in an empty batch except a key
the input itself repeats; COPY cannot skip one, so it fails with a unique violation when it ends,
raised as KeyRepeated, and the caller rolls back and writes the input again with a StageWriter.

``StageWriter`` (Postgres, otherwise): each chunk is COPYed into a temporary table and moved into
``jobs`` by one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. Only when fewer rows went in than
were staged does one join name the staged lines whose key the batch holds for a different job.
Postgres compares them as JSON values (jsonb equality), so ``1`` and ``1.0`` are the same job.

``RowWriter`` (SQLite, the demo): multi-row inserts, comparing content digests in Python.

A writer never commits: the caller decides how much one transaction holds.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import orjson
import psycopg
from psycopg import postgres
from psycopg.adapt import Dumper
from psycopg.pq import Format
from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from pipeline.intake.jobspec import JobSpec
from pipeline.models import Job, JobKind, JobStatus, utcnow

Clash = tuple[int, str]  # (line or index, key) of an item whose key the batch holds for a different job


class KeyRepeated(Exception):
    """The input repeats a key, which a CopyWriter cannot take: write it again with a StageWriter."""


@dataclass
class Written:
    new: int = 0
    clashes: list[Clash] = field(default_factory=list)  # in input order


class Writer(Protocol):
    def add(self, number: int, spec: JobSpec) -> None: ...

    def flush(self) -> Written:
        """Write what was added since the last flush; what it added and what clashed."""

    def close(self) -> None:
        """After the last flush: finish writing (CopyWriter: may raise KeyRepeated)."""

    def abort(self) -> None:
        """Abandon what is being written, for a rollback (a COPY under way is cancelled)."""

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """On an error, abandon what is being written (a COPY is cancelled), for a rollback."""


def open_writer(session: Session, batch_id: int, *, copy: bool) -> Writer:
    """The writer for this database; ``copy``: the caller holds one transaction for the whole
    input, so a CopyWriter may be used if the batch has no jobs yet."""
    if session.get_bind().dialect.name != "postgresql":
        return RowWriter(session, batch_id)
    if copy and session.scalar(select(Job.id).where(Job.batch_id == batch_id).limit(1)) is None:
        return CopyWriter(session, batch_id)
    return StageWriter(session, batch_id)


def to_json(value: Any) -> bytes:
    """JSON as UTF-8, as _JsonbBytes sends it."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits (the standard parser read it exactly)
        return json.dumps(value, ensure_ascii=False).encode()


class _JsonbBytes(Dumper):
    """A jsonb column of a binary COPY (set_types): its value is JSON already encoded, sent after
    the version byte. psycopg's own jsonb dumper would take text, and decoding orjson's bytes
    only for it to encode them again cost about half a microsecond a value."""

    format = Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + obj


class _PgCopy:
    """A binary COPY ... FROM STDIN on the session's own connection, begun at the first row.
    Binary, because Postgres's share of a COPY into ``jobs`` is most of the work, and reading
    binary timestamps and ids took a tenth off it. JSON goes as the bytes to_json made (a jsonb
    in binary is its text after a version byte)."""

    sql = ""
    types: tuple[str, ...] = ()

    def __init__(self, session: Session) -> None:
        self.session = session
        self._stack = ExitStack()
        self._copy: psycopg.Copy | None = None
        self.rows = 0

    @property
    def conn(self) -> psycopg.Connection[Any]:
        # Asked of the session each time: after a commit it may hand out another pooled connection.
        return self.session.connection().connection.driver_connection  # type: ignore[return-value]

    def begin(self) -> None:
        """Before the first row of a COPY."""

    def write(self, row: tuple[Any, ...]) -> None:
        if self._copy is None:
            self.begin()
            cursor = self._stack.enter_context(self.conn.cursor())
            cursor.adapters.register_dumper(None, _JsonbBytes)  # by oid only: for set_types' jsonb
            self._copy = self._stack.enter_context(cursor.copy(self.sql))
            self._copy.set_types(self.types)
        self._copy.write_row(row)
        self.rows += 1

    def end(self) -> None:
        self._copy = None
        self._stack.close()  # sends the end of the data; Postgres's verdict on the rows is raised here

    def abort(self) -> None:
        self.__exit__(_Abandoned, _Abandoned("the input was rejected"), None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # An error while a COPY is open cancels it (psycopg sends CopyFail), so the connection
        # can be rolled back; the error itself goes on.
        self._copy = None
        self._stack.__exit__(exc_type, exc, tb)


class _Abandoned(Exception):
    """What a cancelled COPY tells Postgres."""


_JOB_COLUMNS = "batch_id, key, kind, payload, metadata, pinned_tier, task_id, status, created_at, updated_at"


_KIND = {kind: kind.value for kind in JobKind}  # an Enum's .value is a slow property, for every row


class CopyWriter(_PgCopy):
    sql = f"COPY jobs ({_JOB_COLUMNS}) FROM STDIN (FORMAT BINARY)"
    types = ("int8", "text", "text", "jsonb", "jsonb", "text", "int8", "text", "timestamptz", "timestamptz")

    def __init__(self, session: Session, batch_id: int) -> None:
        super().__init__(session)
        self.batch = batch_id
        self.now = utcnow()
        self.flushed = 0

    def add(self, number: int, spec: JobSpec) -> None:
        self.write((self.batch, spec.key, _KIND[spec.kind], to_json(spec.payload),
                    None if spec.metadata is None else to_json(spec.metadata), spec.tier, spec.task_id, "queued",
                    self.now, self.now))

    def flush(self) -> Written:
        # The rows are already on their way; a chunk here only moves the clock and the count.
        new, self.flushed = self.rows - self.flushed, self.rows
        self.now = utcnow()
        return Written(new)

    def close(self) -> None:
        try:
            self.end()
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "uq_jobs_batch_id_key":
                raise
            raise KeyRepeated(exc.diag.message_detail or "a key repeats") from None


_STAGE = """
    CREATE TEMP TABLE IF NOT EXISTS enqueue_rows (n bigint, key text, kind text, payload jsonb, meta jsonb, tier text,
                                                  task_id bigint)
    ON COMMIT DELETE ROWS
"""
_MOVE = f"""
    INSERT INTO jobs ({_JOB_COLUMNS})
    SELECT %(batch)s, key, kind, payload, meta, tier, task_id, 'queued', %(now)s, %(now)s FROM enqueue_rows ORDER BY n
    ON CONFLICT (batch_id, key) DO NOTHING
"""
# A staged row whose key the batch has is a duplicate if the job there is the same: the row it put
# there itself (ORDER BY n above lets the first of a repeated key win), an earlier chunk's, or a
# previous enqueue's. Otherwise it clashes. LATERAL ... LIMIT 1 (a key is unique in its batch)
# keeps it to one probe of the key index a staged row: as a plain join, the planner hashed the
# whole batch for every chunk, which grows with the batch.
_CLASHES = """
    SELECT s.n, s.key FROM enqueue_rows s
    CROSS JOIN LATERAL (SELECT kind, payload, metadata, pinned_tier, task_id FROM jobs
                        WHERE batch_id = %(batch)s AND key = s.key LIMIT 1) j
    WHERE (j.kind, j.payload, j.metadata, j.pinned_tier, j.task_id)
          IS DISTINCT FROM (s.kind, s.payload, s.meta, s.tier, s.task_id)
    ORDER BY s.n
"""


class StageWriter(_PgCopy):
    sql = "COPY enqueue_rows (n, key, kind, payload, meta, tier, task_id) FROM STDIN (FORMAT BINARY)"
    types = ("int8", "text", "text", "jsonb", "jsonb", "text", "int8")

    def __init__(self, session: Session, batch_id: int) -> None:
        super().__init__(session)
        self.batch = batch_id

    def begin(self) -> None:
        # On the connection at hand: a temporary table is one connection's.
        self.conn.execute(_STAGE)

    def add(self, number: int, spec: JobSpec) -> None:
        self.write((number, spec.key, _KIND[spec.kind], to_json(spec.payload),
                    None if spec.metadata is None else to_json(spec.metadata), spec.tier, spec.task_id))

    def flush(self) -> Written:
        if not self.rows:
            return Written()
        staged, self.rows = self.rows, 0
        self.end()
        params = {"batch": self.batch, "now": utcnow()}
        conn = self.conn
        new = conn.execute(_MOVE, params).rowcount
        clashes: list[Clash] = []
        if new < staged:
            clashes = [(int(n), key) for n, key in conn.execute(_CLASHES, params)]
        # Emptied here too, not only at commit: an atomic enqueue writes every chunk in one
        # transaction, and must not move the earlier chunks again with each later one.
        conn.execute("TRUNCATE enqueue_rows")
        return Written(new, clashes)

    def close(self) -> None:
        pass


class RowWriter:
    """Chunks as multi-row inserts through SQLAlchemy; what a key already names is compared by
    content digest."""

    def __init__(self, session: Session, batch_id: int) -> None:
        self.session = session
        self.batch_id = batch_id
        self.chunk: list[tuple[int, JobSpec]] = []
        self.digests: dict[str, str] = {}
        self.clashes: list[Clash] = []

    def add(self, number: int, spec: JobSpec) -> None:
        seen = self.digests.get(spec.key)
        if seen is not None:
            # The same key twice in one chunk would make one multi-row insert conflict with
            # itself: the same job again is a duplicate; a different one clashes.
            if seen != spec.content_digest():
                self.clashes.append((number, spec.key))
            return
        self.digests[spec.key] = spec.content_digest()
        self.chunk.append((number, spec))

    def flush(self) -> Written:
        written = Written(clashes=self.clashes)
        if self.chunk:
            written.new, existing = self._insert()
            written.clashes = sorted(self.clashes + existing)
        self.chunk, self.digests, self.clashes = [], {}, []
        return written

    def _insert(self) -> tuple[int, list[Clash]]:
        now = utcnow()
        rows = [{"batch_id": self.batch_id, "key": s.key, "kind": s.kind, "payload": s.payload, "meta": s.metadata,
                 "pinned_tier": s.tier, "task_id": s.task_id,
                 "status": JobStatus.QUEUED, "created_at": now, "updated_at": now}
                for _, s in self.chunk]
        stmt = sqlite_insert(Job).on_conflict_do_nothing(index_elements=["batch_id", "key"]).returning(Job.key)
        # RETURNING names only the rows that did not conflict.
        new = set(self.session.scalars(stmt, rows).all())
        seen = [(n, s) for n, s in self.chunk if s.key not in new]
        if not seen:
            return len(new), []
        # A key already there is an idempotent re-run only if it names the same job; the same key
        # for different content is the user's mistake, and silently keeping either would hide it.
        existing = {
            r.key: JobSpec(key=r.key, kind=JobKind(r.kind), payload=r.payload, metadata=r.meta, tier=r.pinned_tier,
                           task_id=r.task_id).content_digest()
            for r in self.session.execute(select(Job.key, Job.kind, Job.payload, Job.meta, Job.pinned_tier, Job.task_id)
                                          .where(Job.batch_id == self.batch_id,
                                                 Job.key.in_([s.key for _, s in seen])))
        }
        return len(new), [(n, s.key) for n, s in seen if existing.get(s.key) != s.content_digest()]

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass
