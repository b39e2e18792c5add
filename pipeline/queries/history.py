"""Job history: the queries behind `switchyard jobs list|show`, `batches`, `cancel` and `export`,
and behind the HTTP API. Plain functions over a session, keyword-only, returning dataclasses; the
CLI and the API only format what they return. None of them commits, except ``cancel_batch``
(see there why).

Indexes (migration ``history_indexes``), each for a query here, at millions of jobs. The plans
below were checked with ``scripts/explain_history.py`` on 1,000,000 jobs in 10 batches
(EXPLAIN ANALYZE, Postgres 15); the times are from that run.

- ``ix_jobs_batch_id_id`` (batch_id, id): ``list_jobs(batch=...)`` walks it backwards from the
  cursor and stops after ``limit`` rows (0.06 ms, first or deep page); ``iter_results`` (export)
  and ``batch_progress`` (enqueue --wait) read one batch through it, never the table.
- ``ix_jobs_batch_id_status_id`` (batch_id, status, id): ``list_jobs(batch=..., status=...)``
  (0.06 ms) and ``cancel_batch``'s "queued jobs of this batch" (2 ms for 1,000 of them), without
  reading the batch's finished jobs. It also carries tier and escalations (INCLUDE, migration
  ``jobs_batch_status_index_covers_stats``), so that ``report.summarize``'s pass over a batch's
  jobs is an index-only scan.
- ``ix_jobs_status_id`` (status, id): ``list_jobs(status=...)`` across batches, e.g. every failed
  job, newest first (0.08 ms), without reading the millions that succeeded.
- ``ix_jobs_created_at`` (BRIN): ``since``/``until``. Jobs are inserted in time order, so a BRIN
  index of a few pages narrows a window to its blocks. A window that ends in the past is turned
  into the range of ids inside it, read once through this index (see ``_filtered``), which bounds
  the walk at both ends: 128 ms -> 5 ms for a one-hour window with the newest id only, and the
  oldest id stops a window that holds less than a page from walking on to the oldest job.
- ``ix_jobs_tier_created_at`` (tier, created_at) WHERE tier IS NOT NULL (migration
  ``history_stats_indexes``): ``list_jobs(tier=..., since=..., until=...)``. Together with the
  window's id range on the primary key it hands over exactly the tier's jobs of the window, where
  a heap filter threw away the other tiers' (bench/history.py, 1M jobs, one-hour windows: p95
  220 ms -> about 5 ms, most of it the id range's lower bound, which ends the walk that went on
  past the window). (tier, id) would match ``ORDER BY id`` and the cursor, but with the window
  already an id range the planner ANDs it with the lossy BRIN bitmap and rechecks every row of
  the window's pages; on (tier, created_at) the window is an exact range. A tier without a window
  is read by walking the primary key back (the tiers are a handful, each a large share of the
  jobs, so a page is found within a few hundred rows).
- ``uq_jobs_batch_id_key`` is built with ``varchar_pattern_ops`` on ``key``: still the
  idempotency key for ``ON CONFLICT (batch_id, key)``, and also a range scan for ``key_prefix``
  (``LIKE 'p%'`` becomes ``key ~>=~ 'p' AND key ~<~ 'q'``; 0.1 ms), which a default-collation
  B-tree cannot serve unless the database collation is "C".
- model_calls, validation_verdicts, routing_decisions and job_events are read per job by their
  ``job_id`` indexes (``get_job``).

What no index makes cheap, on purpose: the per-status counts and costs of ``list_batches`` and
``batch_progress`` are aggregates over every job of the batches shown (0.3 s for 1M jobs, a
parallel scan; 80 ms for a 100k batch), and ``report.summarize`` aggregates the calls of the jobs
it covers (it reads them by job id range; its docstring says how). Counters kept up to date on
each transition would make every worker contend for one row per batch. ``kind`` gets no index,
and ``tier`` only the one for windows above: they filter the rows of one of the scans above.
Every index on ``jobs`` costs a write on each of a job's ~7 transitions (a status change is
never a HOT update), which is why the history adds only five, and the tier one is partial: a
job enters it only once triage has given it a tier (about 3 us a transition after that).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

from sqlalchemy import func, select, true, update
from sqlalchemy.orm import Session

from pipeline.errors import AmbiguousBatch, InvalidQuery, NotFound
from pipeline.flow.states import transition_many
from pipeline.models import (
    TERMINAL,
    Batch,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
    ModelCall,
    RoutingDecision,
    Task,
    Tenant,
    ValidationVerdict,
    utcnow,
)
from pipeline.names import quoted

MAX_LIMIT = 1000
CANCEL_CHUNK = 5000
# How many of the batches holding an ambiguous name its error names: enough to pick from, not a
# screenful when a thousand tenants all have a batch called "test".
MAX_CANDIDATES = 10

# -- filters and parsing -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobFilters:
    """What ``list_jobs`` selects. Empty fields select everything; ``status`` is any of."""

    batch: str | int | None = None  # a batch name (or its numeric id); an int is an id only
    status: tuple[JobStatus, ...] = ()
    tier: str | None = None
    kind: JobKind | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    key_prefix: str | None = None
    # Only this tenant's jobs (the HTTP API always sets it; the CLI with --tenant); None reads
    # every tenant's and the batches of no tenant (the CLI without --tenant).
    tenant_id: int | None = None

    @classmethod
    def read(cls, *, batch: str | None = None, status: list[str] | None = None, tier: str | None = None,
             kind: str | None = None, since: str | None = None, until: str | None = None,
             key_prefix: str | None = None, tenant_id: int | None = None, flag: str = "") -> JobFilters:
        """The filters as a user typed them (CLI options, API query parameters), each checked with
        one sentence naming it; ``flag`` is how the caller spells an option ("--" in the CLI)."""
        return cls(batch=batch, status=tuple(parse_status(x) for x in status or ()), tier=tier,
                   kind=parse_kind(kind) if kind else None,
                   since=parse_time(since, option=f"{flag}since") if since else None,
                   until=parse_time(until, option=f"{flag}until") if until else None,
                   key_prefix=key_prefix, tenant_id=tenant_id)


# ASCII only: ``\d`` (like ``str.isdigit``) also matches other scripts' digits.
_RELATIVE = re.compile(r"^\s*([0-9]+)\s*([smhdw])\s*$", re.ASCII)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# The longest age ``parse_time`` takes. Far longer than any job has lived, and far enough from
# the calendar's ends that subtracting it from now always gives a date.
MAX_AGE = timedelta(days=36_500)
# Ids are Postgres BIGINT (SQLite's integer is as wide): no row has an id past this.
MAX_ID = 2**63 - 1


def parse_id(text: str) -> int | None:
    """The id ``text`` spells in ASCII digits and nothing else, or None. ``str.isdigit`` and
    ``int`` also take ``²`` or ``٣``, signs, spaces and underscores, none of which is an id that
    switchyard printed; and a number past ``MAX_ID`` is no row's id (the database cannot even
    compare one, and ``int`` refuses one of thousands of digits)."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"  # zeros in front change no id, but count against int()'s limit
    if len(digits) > len(str(MAX_ID)):
        return None
    value = int(digits)
    return value if value <= MAX_ID else None


def _is_id(value: int) -> bool:
    """Whether a row could have this id: a lookup of any other answers NotFound without asking
    the database, which would refuse an integer past 64 bits as a bad value, not a missing row."""
    return 0 < value <= MAX_ID


def _age(text: str, option: str, now: datetime) -> datetime | None:
    m = _RELATIVE.match(text)
    if m is None:
        return None
    digits, unit = m.group(1).lstrip("0") or "0", _UNITS[m.group(2)]
    try:
        # More digits than any age up to MAX_AGE has (in seconds) is too far back, and int() would
        # refuse thousands of them.
        age = timedelta(**{unit: int(digits)}) if len(digits) <= 12 else MAX_AGE + MAX_AGE
    except OverflowError:  # past timedelta's own range (a billion days)
        age = MAX_AGE + MAX_AGE
    if age > MAX_AGE:
        raise InvalidQuery(f"{option} {quoted(text)} is too far back: an age is at most {MAX_AGE.days:,}d "
                           f"(100 years); give an ISO 8601 date for anything older")
    return now - age


def parse_time(text: str, *, option: str = "time", now: datetime | None = None) -> datetime:
    """An ISO 8601 date or datetime (UTC unless it says otherwise), or an age such as ``30m``,
    ``6h``, ``2d``, ``1w`` meaning that long before now (at most ``MAX_AGE``)."""
    then = _age(text, option, now or utcnow())
    if then is not None:
        return then
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            parsed = datetime.combine(date.fromisoformat(text.strip()), datetime.min.time())
        except ValueError:
            raise InvalidQuery(f"{option} {quoted(text)} is not a time: use ISO 8601 (2026-11-25 or "
                               f"2026-11-25T14:00:00Z) or an age like 30m, 6h, 2d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_E = TypeVar("_E", JobStatus, JobKind)


def _member(enum: type[_E], text: str, what: str) -> _E:
    try:
        return enum(text)
    except ValueError:
        raise InvalidQuery(f"unknown {what} {quoted(text)}: expected one of "
                           f"{', '.join(m.value for m in enum)}") from None


def parse_status(text: str) -> JobStatus:
    return _member(JobStatus, text, "status")


def parse_kind(text: str) -> JobKind:
    return _member(JobKind, text, "kind")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"j1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The id a page ended at. Opaque to callers, so the paging scheme can change."""
    bad = InvalidQuery(f"cursor {quoted(cursor)} is not one that `jobs list` printed")
    try:
        prefix, _, value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad from None
    last_id = parse_id(value)
    if prefix != "j1" or last_id is None:
        raise bad
    return last_id


# -- serialisation ---------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Dataclasses, enums, Decimals and datetimes as JSON-ready values (money stays exact, as a
    string)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Decimal):
        return f"{obj:f}"  # never "0E-8"
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


# -- batches ---------------------------------------------------------------------------------------


def _tenant_scope(tenant_id: int | None) -> Any:
    """Batches a caller may see: a tenant only its own; no tenant (the operator's CLI) all."""
    return Batch.tenant_id == tenant_id if tenant_id is not None else true()


def find_batch(*, db_session: Session, batch: str | int, tenant_id: int | None = None) -> Batch:
    """A batch by name, or by id when no batch has that name (an int is an id only): the one
    lookup behind every command and endpoint that takes a batch. NotFound otherwise, and also for
    another tenant's batch, so that its existence does not show.

    Names are unique per tenant (and among the batches of no tenant), so with a tenant a name is
    at most one batch; the API always passes its caller's. Without one (the operator's CLI, which
    sees every tenant's batches) a name may be held by several: AmbiguousBatch names them, since
    picking one would read, export or cancel the wrong tenant's work."""
    scope = _tenant_scope(tenant_id)
    if isinstance(batch, int):
        row = db_session.scalar(select(Batch).where(Batch.id == batch, scope)) if _is_id(batch) else None
        if row is None:
            raise NotFound(f"no batch with id {batch}")
        return row
    named = db_session.execute(
        select(Batch, Tenant.name).outerjoin(Tenant, Tenant.id == Batch.tenant_id)
        .where(Batch.name == batch, scope).order_by(Batch.id).limit(MAX_CANDIDATES + 1)
    ).all()
    if len(named) > 1:
        raise _ambiguous(db_session, batch, [(b.id, tenant, b.created_at) for b, tenant in named])
    row = named[0][0] if named else None
    batch_id = parse_id(batch)
    if row is None and batch_id is not None:
        row = db_session.scalar(select(Batch).where(Batch.id == batch_id, scope))
    if row is None:
        raise NotFound(f"no batch named {quoted(batch)} (`switchyard batches` lists them)")
    return row


def _ambiguous(db_session: Session, name: str, candidates: list[tuple[int, str | None, datetime]]) -> AmbiguousBatch:
    total = len(candidates)
    if total > MAX_CANDIDATES:
        total = db_session.scalar(select(func.count()).select_from(Batch).where(Batch.name == name)) or total
        candidates = candidates[:MAX_CANDIDATES]
    shown = ", ".join(f"id {i} ({f'tenant {t}' if t is not None else 'no tenant'}, created {c:%Y-%m-%d %H:%M:%S} UTC)"
                      for i, t, c in candidates)
    more = f", and {total - len(candidates):,} more" if total > len(candidates) else ""
    return AmbiguousBatch(f"batch name {quoted(name)} is held by {total:,} batches: {shown}{more}; pass --tenant "
                          f"NAME, or the batch id instead of the name", candidates=candidates)


@dataclass(frozen=True)
class BatchSummary:
    id: int
    name: str
    tenant: str | None  # None: the operator's own, enqueued with the CLI and no --tenant
    created_at: datetime
    cancelled_at: datetime | None
    jobs: int
    by_status: dict[str, int]
    cost_usd: Decimal
    priority: int = 5  # the dispatcher admits a higher one first (pipeline.flow.admission)

    @property
    def done(self) -> int:
        return sum(n for s, n in self.by_status.items() if JobStatus(s) in TERMINAL)

    @property
    def finished(self) -> bool:
        return self.done == self.jobs


def _batch_counts(db_session: Session, batch_ids: Sequence[int]) -> dict[int, tuple[dict[str, int], Decimal]]:
    if db_session.get_bind().dialect.name == "postgresql":
        # From the rollups: a few rows per batch, whatever its size.
        from pipeline.queries import rollups

        return rollups.batch_counts(db_session, batch_ids)
    out: dict[int, tuple[dict[str, int], Decimal]] = {i: ({}, Decimal(0)) for i in batch_ids}
    if not batch_ids:
        return out
    rows = db_session.execute(
        select(Job.batch_id, Job.status, func.count(), func.coalesce(func.sum(Job.cost_usd), 0))
        .where(Job.batch_id.in_(batch_ids)).group_by(Job.batch_id, Job.status)
    )
    for batch_id, status, n, cost in rows:
        counts, total = out[batch_id]
        counts[JobStatus(status).value] = int(n)
        out[batch_id] = (counts, total + Decimal(cost))
    return out


def _summary(b: Batch, tenant: str | None, counts: dict[str, int], cost: Decimal) -> BatchSummary:
    return BatchSummary(id=b.id, name=b.name, tenant=tenant, created_at=b.created_at, cancelled_at=b.cancelled_at,
                        jobs=sum(counts.values()), by_status=dict(sorted(counts.items())), cost_usd=cost,
                        priority=b.priority)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")


def list_batches(*, db_session: Session, limit: int = 100, tenant_id: int | None = None) -> list[BatchSummary]:
    """The newest ``limit`` batches, each with its tenant, its jobs per status and its cost so far."""
    _check_limit(limit)
    batches = db_session.execute(select(Batch, Tenant.name).outerjoin(Tenant, Tenant.id == Batch.tenant_id)
                                 .where(_tenant_scope(tenant_id)).order_by(Batch.id.desc()).limit(limit)).all()
    counts = _batch_counts(db_session, [b.id for b, _ in batches])
    return [_summary(b, tenant, *counts[b.id]) for b, tenant in batches]


def get_batch(*, db_session: Session, batch: str | int, tenant_id: int | None = None) -> BatchSummary:
    b = find_batch(db_session=db_session, batch=batch, tenant_id=tenant_id)
    tenant = db_session.get(Tenant, b.tenant_id) if b.tenant_id is not None else None
    return _summary(b, tenant.name if tenant else None, *_batch_counts(db_session, [b.id])[b.id])


@dataclass(frozen=True)
class BatchProgress:
    """A batch's state right now: what `enqueue --wait` redraws."""

    batch_id: int
    total: int
    done: int
    by_status: dict[str, int]
    by_tier: dict[str, dict[str, int]]  # tier (or "-" before triage) -> status -> jobs
    cost_usd: Decimal


def batch_progress(*, db_session: Session, batch_id: int) -> BatchProgress:
    by_status: dict[str, int] = {}
    by_tier: dict[str, dict[str, int]] = {}
    cost = Decimal(0)
    for status, tier, n, c in db_session.execute(
        select(Job.status, Job.tier, func.count(), func.coalesce(func.sum(Job.cost_usd), 0))
        .where(Job.batch_id == batch_id).group_by(Job.status, Job.tier)
    ):
        s = JobStatus(status).value
        by_status[s] = by_status.get(s, 0) + int(n)
        tier_counts = by_tier.setdefault(tier or "-", {})
        tier_counts[s] = tier_counts.get(s, 0) + int(n)
        cost += Decimal(c)
    done = sum(n for s, n in by_status.items() if JobStatus(s) in TERMINAL)
    return BatchProgress(batch_id=batch_id, total=sum(by_status.values()), done=done, by_status=by_status,
                         by_tier=by_tier, cost_usd=cost)


@dataclass(frozen=True)
class CancelResult:
    batch: str
    batch_id: int
    cancelled: int  # every job cancelled now: the queued ones and the waiting ones
    cancelled_at: datetime
    # Of ``cancelled``: jobs that were in a stage, waiting out transient errors before trying again.
    waiting: int = 0


def _cancel_chunks(db_session: Session, batch_id: int, *, status: JobStatus, chunk: int, error: str,
                   waiting_only: bool = False) -> int:
    """Cancel the batch's jobs at ``status``, a committed chunk at a time; how many were cancelled."""
    cancelled = 0
    where = [Job.batch_id == batch_id, Job.status == status]
    if waiting_only:
        # Between tries, a stage holds no claim and has no message in the broker (the dispatcher's
        # refeed sends it when its wait ends). The rows stay locked until the chunk commits, so the
        # refeed (SKIP LOCKED) cannot send one of them meanwhile.
        where += [Job.not_before.is_not(None), Job.claimed_at.is_(None)]
    while True:
        ids = db_session.scalars(select(Job.id).where(*where).order_by(Job.id).limit(chunk)
                                 .with_for_update(skip_locked=True)).all()
        if not ids:
            return cancelled
        cancelled += len(transition_many(db_session, ids, frm=status, to=JobStatus.CANCELLED,
                                         detail="batch cancelled", error=error))
        db_session.commit()


def cancel_batch(*, db_session: Session, batch: str | int, chunk: int = CANCEL_CHUNK,
                 tenant_id: int | None = None) -> CancelResult:
    """Cancel every job of the batch that is not being worked: those not started (status queued)
    and those waiting out transient errors between tries (their calls so far stay paid for). A job
    in a call right now finishes.

    Unlike the other functions here this commits, once per chunk: cancelling a million queued jobs
    must not hold a million row locks in one transaction while the dispatcher waits. Each chunk is
    one conditional bulk transition, so a job the dispatcher took meanwhile (it locks with SKIP
    LOCKED, as this does) is left to run, and running the command again is harmless."""
    b = find_batch(db_session=db_session, batch=batch, tenant_id=tenant_id)
    now = utcnow()
    db_session.execute(update(Batch).where(Batch.id == b.id, Batch.cancelled_at.is_(None))
                       .values(cancelled_at=now).execution_options(synchronize_session=False))
    db_session.commit()
    cancelled = _cancel_chunks(db_session, b.id, status=JobStatus.QUEUED, chunk=chunk,
                               error="cancelled before it started")
    # A job paused for its budget (pipeline.flow.budgets) holds no claim and no message either.
    cancelled += _cancel_chunks(db_session, b.id, status=JobStatus.PAUSED, chunk=chunk,
                                error="cancelled while paused for its budget")
    waiting = sum(_cancel_chunks(db_session, b.id, status=status, chunk=chunk, waiting_only=True,
                                 error=f"cancelled in the {status.value} stage, while waiting out transient errors")
                  for status in (JobStatus.TRIAGING, JobStatus.WORKING, JobStatus.VALIDATING))
    db_session.refresh(b)
    return CancelResult(batch=b.name, batch_id=b.id, cancelled=cancelled + waiting,
                        cancelled_at=b.cancelled_at or now, waiting=waiting)


# -- jobs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSummary:
    id: int
    batch: str
    key: str
    kind: str
    status: str
    tier: str | None
    difficulty: str | None
    attempt: int
    escalations: int
    cost_usd: Decimal
    created_at: datetime
    finished_at: datetime | None
    error: str | None


@dataclass(frozen=True)
class JobPage:
    jobs: list[JobSummary]
    next_cursor: str | None  # None on the last page


_SUMMARY_COLUMNS = (Job.id, Batch.name, Job.key, Job.kind, Job.status, Job.tier, Job.difficulty, Job.attempt,
                    Job.escalations, Job.cost_usd, Job.created_at, Job.finished_at, Job.error)


def _job_summary(row: Any) -> JobSummary:
    (id_, batch, key, kind, status, tier, difficulty, attempt, escalations, cost, created, finished, error) = row
    return JobSummary(id=id_, batch=batch, key=key, kind=JobKind(kind).value, status=JobStatus(status).value,
                      tier=tier, difficulty=difficulty, attempt=attempt, escalations=escalations,
                      cost_usd=Decimal(cost), created_at=created, finished_at=finished, error=error)


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _filtered(db_session: Session, stmt: Any, filters: JobFilters) -> Any:
    if filters.batch is not None:
        stmt = stmt.where(Job.batch_id == find_batch(db_session=db_session, batch=filters.batch,
                                                     tenant_id=filters.tenant_id).id)
    if filters.tenant_id is not None:
        stmt = stmt.where(Batch.tenant_id == filters.tenant_id)
    if filters.status:
        one = len(filters.status) == 1
        stmt = stmt.where(Job.status == filters.status[0] if one else Job.status.in_(filters.status))
    if filters.tier is not None:
        stmt = stmt.where(Job.tier == filters.tier)
    if filters.kind is not None:
        stmt = stmt.where(Job.kind == filters.kind)
    if filters.since is not None:
        stmt = stmt.where(Job.created_at >= filters.since)
    if filters.until is not None:
        stmt = stmt.where(Job.created_at < filters.until)
        if filters.batch is None and not filters.status:
            # A window that ends in the past: left alone, the planner walks the primary key back
            # from the newest job, through every job created since, and on past the window's
            # start to the oldest job when the window holds fewer matching jobs than a page. The
            # window's newest and oldest ids bound that walk at both ends (safely: no job of the
            # window lies outside them, whatever order ids and created_at are in). Both come from
            # one read of the window through the created_at BRIN index; "id + 0" stops the
            # planner from turning max(id) into the same backward walk.
            window = [Job.created_at < filters.until]
            if filters.since is not None:
                window.append(Job.created_at >= filters.since)
            ids = select(func.min(Job.id + 0).label("lo"), func.max(Job.id + 0).label("hi")).where(*window) \
                .cte("window_ids")
            stmt = stmt.where(Job.id <= select(ids.c.hi).scalar_subquery())
            if filters.since is not None:
                stmt = stmt.where(Job.id >= select(ids.c.lo).scalar_subquery())
    if filters.key_prefix:
        stmt = stmt.where(Job.key.like(_like_prefix(filters.key_prefix), escape="\\"))
    return stmt


def list_jobs(*, db_session: Session, filters: JobFilters | None = None, limit: int = 50,
              cursor: str | None = None) -> JobPage:
    """One page of jobs, newest first. Pass the page's ``next_cursor`` back for the next one.

    Keyset pagination on id (``id < cursor``), never OFFSET: page 10,000 costs what page 1 does,
    and jobs added meanwhile neither shift nor repeat rows."""
    _check_limit(limit)
    stmt = select(*_SUMMARY_COLUMNS).join(Batch, Batch.id == Job.batch_id)
    stmt = _filtered(db_session, stmt, filters or JobFilters())
    if cursor is not None:
        stmt = stmt.where(Job.id < decode_cursor(cursor))
    rows = db_session.execute(stmt.order_by(Job.id.desc()).limit(limit + 1)).all()
    jobs = [_job_summary(r) for r in rows[:limit]]
    return JobPage(jobs=jobs, next_cursor=encode_cursor(jobs[-1].id) if len(rows) > limit else None)


@dataclass(frozen=True)
class CallRecord:
    id: int
    stage: str
    tier: str
    model: str
    attempt: int
    delivery: int
    outcome: str
    applied: bool
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: Decimal
    latency_ms: float | None
    request_id: str | None
    status_code: int | None
    stop_reason: str | None
    error_type: str | None
    error_message: str | None
    started_at: datetime
    finished_at: datetime | None
    # The message batch that answered the call (economy mode); None for a synchronous call.
    message_batch_id: str | None = None


@dataclass(frozen=True)
class RoutingRecord:
    reason_kind: str  # triage | pinned | retry | escalation
    verdict: str | None
    confidence: float | None
    reason: str | None
    from_tier: str | None
    to_tier: str
    at: datetime


@dataclass(frozen=True)
class VerdictRecord:
    tier: str
    attempt: int
    validator: str
    ok: bool
    problems: list[str]
    at: datetime


@dataclass(frozen=True)
class EventRecord:
    from_status: str | None
    to_status: str
    at: datetime
    detail: str | None


@dataclass(frozen=True)
class JobStory:
    """Everything that happened to one job, each list in the order it happened."""

    job: JobSummary
    payload: dict[str, Any]
    metadata: dict[str, Any] | None
    pinned_tier: str | None
    output: Any
    # The task version the job was bound to at enqueue; None for a job without a task.
    task: str | None = None
    task_version: int | None = None
    # A stage waiting out transient errors: when it is tried again, and since when it has met only
    # those (its patience is counted from there). Both None otherwise.
    next_try_at: datetime | None = None
    transient_since: datetime | None = None
    routing: list[RoutingRecord] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    # Economy mode (pipeline.flow.economy): the batch's mode, and what economy had to do out of the
    # ordinary for the job (a call that went the standard path after expiring twice).
    mode: str = "standard"
    economy_note: str | None = None
    validations: list[VerdictRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)

    @property
    def triage(self) -> RoutingRecord | None:
        return next((r for r in self.routing if r.reason_kind == "triage"), None)

    @property
    def escalations(self) -> list[RoutingRecord]:
        return [r for r in self.routing if r.reason_kind == "escalation"]


def find_job_id(*, db_session: Session, batch: str, key: str, tenant_id: int | None = None) -> int:
    """The id of the job with this key in this batch (the key a user put in their file)."""
    b = find_batch(db_session=db_session, batch=batch, tenant_id=tenant_id)
    job_id = db_session.scalar(select(Job.id).where(Job.batch_id == b.id, Job.key == key))
    if job_id is None:
        raise NotFound(f"batch {quoted(b.name)} has no job with key {quoted(key)}")
    return job_id


def get_job(*, db_session: Session, job_id: int, tenant_id: int | None = None) -> JobStory:
    if not _is_id(job_id):
        raise NotFound(f"no job with id {job_id}")
    row: Any = db_session.execute(
        select(*_SUMMARY_COLUMNS, Job.payload, Job.meta, Job.pinned_tier, Job.output, Task.name, Task.version,
               Job.not_before, Job.transient_since, Batch.mode, Job.economy_note)
        .join(Batch, Batch.id == Job.batch_id).outerjoin(Task, Task.id == Job.task_id)
        .where(Job.id == job_id, _tenant_scope(tenant_id))
    ).first()
    if row is None:
        raise NotFound(f"no job with id {job_id}")
    payload, meta, pinned, output, task, task_version, not_before, transient_since, mode, note = row[-10:]
    calls = [
        CallRecord(id=c.id, stage=c.stage.value, tier=c.tier, model=c.model, attempt=c.attempt, delivery=c.delivery,
                   outcome=c.outcome, applied=c.applied, input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                   cache_creation_input_tokens=c.cache_creation_input_tokens,
                   cache_read_input_tokens=c.cache_read_input_tokens, cost_usd=Decimal(c.cost_usd),
                   latency_ms=c.latency_ms, request_id=c.request_id, status_code=c.status_code,
                   stop_reason=c.stop_reason, error_type=c.error_type, error_message=c.error_message,
                   started_at=c.started_at, finished_at=c.finished_at, message_batch_id=c.message_batch_id)
        for c in db_session.scalars(select(ModelCall).where(ModelCall.job_id == job_id).order_by(ModelCall.id))
    ]
    routing = [
        RoutingRecord(reason_kind=r.reason_kind, verdict=r.verdict, confidence=r.confidence, reason=r.reason,
                      from_tier=r.from_tier, to_tier=r.to_tier, at=r.created_at)
        for r in db_session.scalars(select(RoutingDecision).where(RoutingDecision.job_id == job_id)
                                    .order_by(RoutingDecision.id))
    ]
    validations = [
        VerdictRecord(tier=v.tier, attempt=v.attempt, validator=v.validator, ok=v.ok, problems=list(v.problems or []),
                      at=v.created_at)
        for v in db_session.scalars(select(ValidationVerdict).where(ValidationVerdict.job_id == job_id)
                                    .order_by(ValidationVerdict.id))
    ]
    events = [
        EventRecord(from_status=e.from_status.value if e.from_status else None, to_status=e.to_status.value,
                    at=e.at, detail=e.detail)
        for e in db_session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
    ]
    return JobStory(job=_job_summary(row[:len(_SUMMARY_COLUMNS)]), payload=payload, metadata=meta,
                    pinned_tier=pinned, output=output, task=task, task_version=task_version,
                    next_try_at=not_before, transient_since=transient_since, routing=routing,
                    calls=calls, validations=validations, events=events, mode=mode or "standard",
                    economy_note=note)


# -- export ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultRow:
    key: str
    status: str
    tier: str | None
    output: Any
    error: str | None
    cost_usd: Decimal


EXPORT_FIELDS = tuple(f.name for f in fields(ResultRow))


def iter_results(*, db_session: Session, batch_id: int, chunk: int = 1000) -> Iterator[ResultRow]:
    """Every job of a batch in the order it was enqueued, streamed: a server-side cursor on
    Postgres fetches ``chunk`` rows at a time, so a million-job export holds one chunk."""
    stmt = (select(Job.key, Job.status, Job.tier, Job.output, Job.error, Job.cost_usd)
            .where(Job.batch_id == batch_id).order_by(Job.id)
            .execution_options(yield_per=chunk))
    for key, status, tier, output, error, cost in db_session.execute(stmt):
        yield ResultRow(key=key, status=JobStatus(status).value, tier=tier, output=output, error=error,
                        cost_usd=Decimal(cost))
