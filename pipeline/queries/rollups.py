"""Rollups: each batch's figures per tier (``rollup_totals``) and per tier and minute
(``rollup_minutes``), folded from the job and call records by the dispatcher every few seconds, so
that `stats`, `batches` and the dashboard read a few rows per batch instead of every call.

What is folded, and when
  - A **call** is folded once it has finished, ok or error: those two outcomes are written only by
    the stage that made the call, in the statement that records it, and never change after. A call
    still "started" is in flight; an "abandoned" one (its worker died) may still turn ok or error
    when a slow worker comes back (the record updates its row by id), so abandoned calls are never
    folded: they stay in the live tail, read from the raw rows, and there are few of them.
    Shadow evaluation's calls are marked folded and left out, as `stats` leaves them out.
  - A **job** is folded once it has ended (succeeded, failed, cancelled), with what was decided
    about it: its escalations, the verdicts on its answers, the tiers it worked at, and the tokens
    of its last successful work call (the top-tier comparison). Verdicts and routing decisions are
    written only with a move of the job (``Also(when="moved")``), and an ended job never moves
    again, so these are final when the job is folded.

How the fold knows what it has folded: a flag, not an id watermark
  ``jobs.rolled_up`` and ``model_calls.rolled_up`` are set by the fold in the same statement that
  adds the rows to the rollups, and partial indexes (``ix_jobs_unrolled``, ``ix_model_calls_unrolled``)
  hold only the rows not folded yet, so the fold and the live tail read a few thousand index
  entries whatever the history. An id watermark ("every call up to id N is folded") would be wrong
  here twice over: ids are allocated when a statement runs, not when it commits, so a call with a
  lower id can commit after the fold has read past it; and a call row is written twice (started,
  then ok or error, often minutes apart) and jobs end in any order of their ids, so "up to N"
  never describes what is final. A flag on the row is exact whatever the commit order: a row is
  folded when the fold sees it final, once, in the transaction that adds it up. The flag's column
  is written only by the fold, so a worker's update of its call row stays a HOT update as before
  (the partial index's predicate does not change under it), and the enqueue's COPY writes no entry
  (queued jobs are not in ``ix_jobs_unrolled``).

Two dispatchers, and readers
  The fold takes a transaction-level advisory lock (``LOCK``) with ``pg_try_advisory_xact_lock``:
  a second dispatcher skips its round instead of folding the same rows. The rows' conditions are
  repeated in the UPDATE itself, so even without the lock a row could not be added twice (the
  second UPDATE re-checks ``NOT rolled_up`` on the row it waited for). A reader must see the
  rollups and the tail as of one moment, or a fold committing between two reads would count its
  rows twice or not at all: `stats` reads both in one statement, so in one snapshot
  (``_read_statement``); `batches` holds the same lock shared across its few statements
  (``_no_fold``), so no fold commits meanwhile. Either way the figures are exact and current.

Postgres only: on SQLite (the demo) `stats` reads the raw rows as before.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import ModelConfig
from pipeline.db import Executor, dialect_name
from pipeline.models import LATENCY_BUCKETS, UNROLLED_JOBS, utcnow
from pipeline.queries.report import FailureReason, Summary, TierLine, cache_saving

# The advisory lock of the fold (exclusive) and of readers (shared): "SWRU".
LOCK = 0x53575255
# Rows folded in one statement: a round of the dispatcher stays short, and a backlog (an upgrade
# from before rollups, a rebuild) is folded over several rounds.
CHUNK = 10_000

JOB_FIGURES = ("jobs_succeeded", "jobs_failed", "jobs_cancelled", "job_escalations", "escalations", "worked",
               "validations", "validations_failed", "top_input_tokens", "top_output_tokens",
               "top_cache_creation_input_tokens", "top_cache_read_input_tokens")
CALL_FIGURES = ("calls", "failed_calls", "repeated_calls", "input_tokens", "output_tokens",
                "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "repeated_cost_usd")
FIGURES = JOB_FIGURES + CALL_FIGURES
TOP = ("top_input_tokens", "top_output_tokens", "top_cache_creation_input_tokens", "top_cache_read_input_tokens")
NO_TIER = "-"  # a job that ended with no tier (cancelled or failed before triage routed it)
EVALUATION = "('shadow', 'judge')"
# Every status a job can leave (a paused job resumes): its figures stay in the live tail until it ends.
NOT_ENDED = "('queued', 'triaging', 'working', 'validating', 'paused')"

# -- the latency histogram -------------------------------------------------------------------------

# Four buckets per doubling: bucket 0 is under 1 ms, bucket k covers [2^((k-1)/4), 2^(k/4)) ms, and
# the last is everything from 2^(79/4) ms (about 14.6 min) up. The same float bounds go to Postgres
# (width_bucket) and to Python (bisect), so both put a latency in the same bucket.
PER_DOUBLING = 4
BOUNDS: tuple[float, ...] = tuple(2 ** (k / PER_DOUBLING) for k in range(LATENCY_BUCKETS - 1))
# A percentile is reported as its bucket's geometric middle: at most this far, relative, from the
# latency of the call at that rank, for any latency from 1 ms to the last bucket's bound.
BUCKET_ERROR = 2 ** (1 / (2 * PER_DOUBLING)) - 1  # 9.05%
_BOUNDS_SQL = "ARRAY[" + ", ".join(repr(b) for b in BOUNDS) + "]::float8[]"


def bucket_sql(column: str) -> str:
    """The bucket of a latency in milliseconds, in SQL (NULL for none)."""
    return f"width_bucket({column}::float8, {_BOUNDS_SQL})"


def bucket(ms: float) -> int:
    return bisect.bisect_right(BOUNDS, ms)


def bucket_value(k: int) -> float:
    """What a latency in bucket ``k`` is reported as."""
    if k == 0:
        return 0.5
    if k >= LATENCY_BUCKETS - 1:
        return BOUNDS[-1]
    return 2 ** ((k - 0.5) / PER_DOUBLING)


def histogram(values: Sequence[float | None]) -> list[int]:
    out = [0] * LATENCY_BUCKETS
    for v in values:
        if v is not None:
            out[bucket(v)] += 1
    return out


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The q-quantile of the calls counted in ``hist``: the bucket of the call at rank
    floor(q * (n - 1)) (where percentile_cont starts interpolating), as its middle value."""
    n = sum(hist)
    if not n:
        return None
    rank = math.floor(q * (n - 1))
    seen = 0
    for k, c in enumerate(hist):
        seen += c
        if seen > rank:
            return bucket_value(k)
    return bucket_value(LATENCY_BUCKETS - 1)  # pragma: no cover - the counts add up to n


def _add_hist(a: list[int] | None, b: Sequence[int] | None) -> list[int] | None:
    if b is None:
        return a
    if a is None:
        return list(b)
    return [x + y for x, y in zip(a, b, strict=True)]


# -- the fold --------------------------------------------------------------------------------------


def _upsert(table: str, keys: Sequence[str], figures: Sequence[str], source: str, *, hist: bool) -> str:
    """INSERT the rows of ``source`` into a rollup table, adding to a row that is there."""
    cols = [*keys, *figures, *(["latency_histogram"] if hist else [])]
    sets = [f"{f} = {table}.{f} + excluded.{f}" for f in figures]
    if hist:
        sets.append(
            f"latency_histogram = CASE WHEN {table}.latency_histogram IS NULL THEN excluded.latency_histogram "
            f"ELSE ARRAY(SELECT a + b FROM unnest({table}.latency_histogram, excluded.latency_histogram) "
            "WITH ORDINALITY AS h(a, b, i) ORDER BY i) END")
    return (f"INSERT INTO {table} ({', '.join(cols)}) {source} "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(sets)}")


def _arm(keys: str, figures: Mapping[str, str], rest: str) -> str:
    """One arm of the job figures: ``keys`` (batch_id, tier, minute), every job figure (0 unless
    given), from ``rest``."""
    return f"SELECT {keys}, " + ", ".join(f"{figures.get(f, '0')} AS {f}" for f in JOB_FIGURES) + f" {rest}"


def _job_figures(jobs: str) -> str:
    """The job figures of the jobs in the CTE ``jobs`` (id, batch_id, tier, status, escalations,
    minute), keyed by batch, tier and minute: one UNION ALL arm for each table they come from."""
    ok_work = "c.stage = 'work' AND c.outcome = 'ok'"
    return " UNION ALL ".join([
        _arm("batch_id, tier, minute", {
            "jobs_succeeded": "count(*) FILTER (WHERE status = 'succeeded')",
            "jobs_failed": "count(*) FILTER (WHERE status = 'failed')",
            "jobs_cancelled": "count(*) FILTER (WHERE status = 'cancelled')",
            "job_escalations": "coalesce(sum(escalations), 0)"}, f"FROM {jobs} GROUP BY 1, 2, 3"),
        _arm(f"j.batch_id, coalesce(d.from_tier, '{NO_TIER}'), j.minute", {"escalations": "count(*)"},
             f"FROM routing_decisions d JOIN {jobs} j ON j.id = d.job_id WHERE d.reason_kind = 'escalation' "
             "GROUP BY 1, 2, 3"),
        _arm("j.batch_id, v.tier, j.minute", {"validations": "count(*)", "validations_failed":
                                              "count(*) FILTER (WHERE NOT v.ok)"},
             f"FROM validation_verdicts v JOIN {jobs} j ON j.id = v.job_id GROUP BY 1, 2, 3"),
        _arm("j.batch_id, c.tier, j.minute", {"worked": "count(DISTINCT c.job_id)"},
             f"FROM model_calls c JOIN {jobs} j ON j.id = c.job_id WHERE c.stage = 'work' GROUP BY 1, 2, 3"),
        _arm("j.batch_id, j.tier, j.minute", {f"top_{t}": f"sum(l.{t})" for t in
                                              ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                                               "cache_read_input_tokens")},
             "FROM (SELECT DISTINCT ON (c.job_id) c.job_id, c.input_tokens, c.output_tokens, "
             "c.cache_creation_input_tokens, c.cache_read_input_tokens FROM model_calls c "
             f"WHERE c.job_id IN (SELECT id FROM {jobs}) AND {ok_work} ORDER BY c.job_id, c.id DESC) l "
             f"JOIN {jobs} j ON j.id = l.job_id GROUP BY 1, 2, 3"),
    ])


def _sums(figures: Sequence[str]) -> str:
    return ", ".join(f"sum({f})" for f in figures)


_FOLD_JOBS = text(
    "WITH j AS MATERIALIZED ("
    f"  UPDATE jobs SET rolled_up = true WHERE id IN (SELECT id FROM jobs WHERE {UNROLLED_JOBS} ORDER BY id "
    f"  LIMIT :chunk) AND {UNROLLED_JOBS}"
    f"  RETURNING id, batch_id, coalesce(tier, '{NO_TIER}') AS tier, status, escalations,"
    "   date_trunc('minute', coalesce(finished_at, updated_at)) AS minute,"
    "   coalesce(failure_reason, error, '(no reason recorded)') AS reason),"
    f" f AS MATERIALIZED ({_job_figures('j')}),"
    " m AS (" + _upsert("rollup_minutes", ("batch_id", "tier", "minute"), JOB_FIGURES,
                        f"SELECT batch_id, tier, minute, {_sums(JOB_FIGURES)} FROM f GROUP BY 1, 2, 3", hist=False)
    + "), t AS (" + _upsert("rollup_totals", ("batch_id", "tier"), JOB_FIGURES,
                            f"SELECT batch_id, tier, {_sums(JOB_FIGURES)} FROM f GROUP BY 1, 2", hist=False)
    + "), r AS (INSERT INTO rollup_failures (batch_id, reason_md5, reason, jobs) "
    "SELECT batch_id, md5(reason), min(reason), count(*) FROM j WHERE status = 'failed' GROUP BY 1, 2 "
    "ON CONFLICT (batch_id, reason_md5) DO UPDATE SET jobs = rollup_failures.jobs + excluded.jobs"
    ") SELECT count(*) FROM j")


def _call_figures() -> str:
    """The call figures, in CALL_FIGURES' order, and the latency histogram, over rows that have
    the call's columns and b, its latency bucket."""
    hist = "ARRAY[" + ", ".join(f"count(*) FILTER (WHERE b = {k})" for k in range(LATENCY_BUCKETS)) + "]"
    return ", ".join([
        "count(*)", "count(*) FILTER (WHERE outcome = 'error')", "count(*) FILTER (WHERE delivery > 1)",
        "sum(input_tokens)", "sum(output_tokens)", "sum(cache_creation_input_tokens)",
        "sum(cache_read_input_tokens)", "sum(cost_usd)", "coalesce(sum(cost_usd) FILTER (WHERE delivery > 1), 0)",
        hist])


_FOLD_CALLS = text(
    "WITH c AS MATERIALIZED ("
    "  UPDATE model_calls SET rolled_up = true WHERE id IN (SELECT id FROM model_calls WHERE NOT rolled_up"
    "  AND outcome IN ('ok', 'error') LIMIT :chunk) AND NOT rolled_up AND outcome IN ('ok', 'error')"
    "  RETURNING job_id, stage, tier, outcome, delivery, input_tokens, output_tokens,"
    "  cache_creation_input_tokens, cache_read_input_tokens, cost_usd, latency_ms,"
    "  date_trunc('minute', coalesce(finished_at, started_at)) AS minute),"
    f" k AS MATERIALIZED (SELECT j.batch_id, c.*, {bucket_sql('c.latency_ms')} AS b FROM c"
    f"  JOIN jobs j ON j.id = c.job_id WHERE c.stage NOT IN {EVALUATION}),"
    " m AS (" + _upsert("rollup_minutes", ("batch_id", "tier", "minute"), CALL_FIGURES,
                        f"SELECT batch_id, tier, minute, {_call_figures()} FROM k GROUP BY 1, 2, 3", hist=True)
    + "), t AS (" + _upsert("rollup_totals", ("batch_id", "tier"), CALL_FIGURES,
                            f"SELECT batch_id, tier, {_call_figures()} FROM k GROUP BY 1, 2", hist=True)
    + ") SELECT count(*) FROM c")


@dataclass(frozen=True)
class Folded:
    jobs: int
    calls: int
    locked: bool = False  # another fold held the lock: nothing was done

    @property
    def full(self) -> bool:
        """A whole chunk of either: more may be waiting."""
        return self.jobs >= CHUNK or self.calls >= CHUNK


def fold(conn: Executor, *, chunk: int = CHUNK) -> Folded:
    """Fold up to ``chunk`` ended jobs and ``chunk`` finished calls into the rollups, in the
    caller's transaction (which must commit for it to count). Nothing on SQLite."""
    if dialect_name(conn) != "postgresql":
        return Folded(0, 0)
    if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LOCK}).scalar_one():
        return Folded(0, 0, locked=True)
    jobs = conn.execute(_FOLD_JOBS, {"chunk": chunk}).scalar_one()
    calls = conn.execute(_FOLD_CALLS, {"chunk": chunk}).scalar_one()
    return Folded(int(jobs), int(calls))


def rebuild(session: Session, *, chunk: int = 100_000, progress: Any = None) -> Folded:
    """Empty the rollups and fold every record again, from the raw rows (`switchyard db
    rebuild-rollups`). The emptying and the unmarking are one transaction, so a reader meanwhile
    finds the rows either in the rollups or in the live tail, never in both; the folding is then
    committed a chunk at a time (a dispatcher folding meanwhile only helps)."""
    if dialect_name(session) != "postgresql":
        return Folded(0, 0)
    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK})
    for table in ("rollup_totals", "rollup_minutes", "rollup_failures"):
        session.execute(text(f"DELETE FROM {table}"))
    session.execute(text("UPDATE jobs SET rolled_up = false WHERE rolled_up"))
    session.execute(text("UPDATE model_calls SET rolled_up = false WHERE rolled_up"))
    session.commit()
    jobs = calls = 0
    while True:
        done = fold(session, chunk=chunk)
        session.commit()
        if done.locked:  # a dispatcher is folding: wait for it, then go on
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK})
            session.commit()
            continue
        jobs, calls = jobs + done.jobs, calls + done.calls
        if progress is not None:
            progress(jobs, calls)
        if done.jobs < chunk and done.calls < chunk:
            return Folded(jobs, calls)


# -- reading: the rollups plus the live tail ---------------------------------------------------------


@contextmanager
def _no_fold(session: Session) -> Iterator[None]:
    """No fold commits while the caller reads the rollups and the tail (see the module's docstring)."""
    session.execute(text("SELECT pg_advisory_lock_shared(:k)"), {"k": LOCK})
    try:
        yield
    finally:
        session.execute(text("SELECT pg_advisory_unlock_shared(:k)"), {"k": LOCK})


def _scope(batch_id: int | None, tenant_id: int | None, column: str = "batch_id") -> str:
    conds = ["true"]
    if batch_id is not None:
        conds.append(f"{column} = :batch_id")
    if tenant_id is not None:
        conds.append(f"{column} IN (SELECT id FROM batches WHERE tenant_id = :tenant_id)")
    return " AND ".join(conds)


@dataclass
class _Figures:
    """One tier's figures as the rollups keep them."""

    values: dict[str, Any]
    hist: list[int] | None = None

    @classmethod
    def empty(cls) -> _Figures:
        return cls(dict.fromkeys(FIGURES, 0))

    def add(self, row: Mapping[str, Any]) -> None:
        for f in FIGURES:
            if row.get(f) is not None:
                self.values[f] += row[f]
        self.hist = _add_hist(self.hist, row.get("latency_histogram"))


# The job figures that come from a job's calls, verdicts and decisions, not from its own row.
_CHILD_FIGURES = tuple(f for f in JOB_FIGURES if not f.startswith("jobs_") and f != "job_escalations")


def _tail_jobs(jobs_scope: str) -> str:
    """The jobs of the scope not in the rollups: queued, in a stage, or ended and not folded yet.
    A queued job has made no call and has no verdict or decision (queued is only ever a job's first
    status), but rows that say otherwise are still counted, as the raw path counts them: exact
    whatever the rows, at the price of reading a queued backlog's ids."""
    return (f"SELECT id, batch_id, coalesce(tier, '{NO_TIER}') AS tier, status, escalations, "
            f"NULL::timestamptz AS minute FROM jobs WHERE {jobs_scope} AND status IN {NOT_ENDED} "
            f"UNION ALL SELECT id, batch_id, coalesce(tier, '{NO_TIER}'), status, escalations, NULL "
            f"FROM jobs WHERE {UNROLLED_JOBS} AND {jobs_scope}")


def _money(*columns: str) -> str:
    """jsonb_build_object arguments for money columns, as exact text (a JSON number is a float)."""
    return ", ".join(f"'{c}', {c}::text" for c in columns)


def _read_statement(batch_id: int | None, tenant_id: int | None) -> str:
    """The rollups and the tail of a scope in one statement, so in one snapshot: a fold that
    commits meanwhile is either wholly in what it reads or not at all, with no lock, and it costs
    one round trip. Each row is a kind and a JSON object of figures."""
    scope = _scope(batch_id, tenant_id)
    tail = _tail_jobs(scope)
    calls = (f"SELECT c.*, {bucket_sql('c.latency_ms')} AS b FROM model_calls c JOIN jobs j ON j.id = c.job_id "
             f"WHERE NOT c.rolled_up AND c.stage NOT IN {EVALUATION} AND {_scope(batch_id, tenant_id, 'j.batch_id')}")
    return (
        f"WITH t AS MATERIALIZED ({tail}), f AS ({_job_figures('t')}) "
        # The rollups.
        f"SELECT 'total' AS kind, to_jsonb(r) || jsonb_build_object({_money('cost_usd', 'repeated_cost_usd')}) "
        f"FROM rollup_totals r WHERE {scope} "
        # The jobs not folded: queued, in a stage, or ended since the last fold.
        "UNION ALL SELECT 'jobs', jsonb_build_object('status', status, 'tier', tier, 'n', n, 'esc', esc) FROM ("
        "SELECT status, tier, count(*) AS n, coalesce(sum(escalations), 0) AS esc FROM t GROUP BY 1, 2) q "
        # What was decided about those (none for queued jobs).
        f"UNION ALL SELECT 'child', to_jsonb(x) FROM (SELECT tier, "
        f"{', '.join(f'sum({x}) AS {x}' for x in _CHILD_FIGURES)} FROM f GROUP BY tier) x "
        # The calls not folded: in flight, finished since the last fold, or abandoned; by tier and
        # latency bucket (a few rows; one aggregate per bucket would take far longer to plan).
        "UNION ALL SELECT 'calls', jsonb_build_object('tier', tier, 'b', b, 'calls', count(*), "
        "'failed_calls', count(*) FILTER (WHERE outcome = 'error'), "
        "'repeated_calls', count(*) FILTER (WHERE delivery > 1), 'input_tokens', sum(input_tokens), "
        "'output_tokens', sum(output_tokens), 'cache_creation_input_tokens', sum(cache_creation_input_tokens), "
        "'cache_read_input_tokens', sum(cache_read_input_tokens), 'cost_usd', sum(cost_usd)::text, "
        "'repeated_cost_usd', coalesce(sum(cost_usd) FILTER (WHERE delivery > 1), 0)::text, "
        f"'abandoned', count(*) FILTER (WHERE outcome = 'abandoned')) FROM ({calls}) k GROUP BY tier, b "
        # The failure reasons, folded and not.
        "UNION ALL SELECT 'reason', jsonb_build_object('reason', reason, 'n', n) FROM ("
        f"SELECT reason, jobs AS n FROM rollup_failures WHERE {scope} "
        "UNION ALL SELECT coalesce(failure_reason, error, '(no reason recorded)'), 1 FROM t "
        "JOIN jobs USING (id) WHERE t.status = 'failed') rs")


def _read(session: Session, batch_id: int | None, tenant_id: int | None
          ) -> tuple[dict[str, _Figures], dict[str, int], dict[str, int]]:
    """Per tier, the rollups plus the tail; the jobs per status; the failure reasons' counts."""
    tiers: dict[str, _Figures] = {}

    def line(tier: str) -> _Figures:
        return tiers.setdefault(tier, _Figures.empty())

    by_status: dict[str, int] = {}
    reasons: dict[str, int] = {}
    rows = session.execute(text(_read_statement(batch_id, tenant_id)),
                           {"batch_id": batch_id, "tenant_id": tenant_id})
    for kind, row in rows:
        if kind == "total":
            line(row["tier"]).add({**row, "cost_usd": Decimal(row["cost_usd"]),
                                   "repeated_cost_usd": Decimal(row["repeated_cost_usd"])})
            for status in ("succeeded", "failed", "cancelled"):
                if n := row[f"jobs_{status}"]:
                    by_status[status] = by_status.get(status, 0) + n
        elif kind == "jobs":
            status, n = row["status"], row["n"]
            by_status[status] = by_status.get(status, 0) + n
            values = line(row["tier"]).values
            values["job_escalations"] += row["esc"]
            if status in ("succeeded", "failed", "cancelled"):
                values[f"jobs_{status}"] += n
            else:
                values["jobs_live"] = values.get("jobs_live", 0) + n
        elif kind == "child":
            line(row["tier"]).add(row)
        elif kind == "calls":
            fig = line(row["tier"])
            hist = None
            if row["b"] is not None:
                hist = [0] * LATENCY_BUCKETS
                hist[row["b"]] = row["calls"]
            fig.add({**row, "cost_usd": Decimal(row["cost_usd"]),
                     "repeated_cost_usd": Decimal(row["repeated_cost_usd"]), "latency_histogram": hist})
            fig.values["abandoned_calls"] = fig.values.get("abandoned_calls", 0) + row["abandoned"]
        else:  # "reason"
            reasons[row["reason"]] = reasons.get(row["reason"], 0) + int(row["n"])
    return tiers, by_status, reasons


def summarize(session: Session, config: ModelConfig, *, batch_id: int | None = None,
              tenant_id: int | None = None) -> Summary:
    """``report.summarize`` of a batch, a tenant's jobs or all jobs, from the rollups and the live
    tail: exact and current, but for the latency percentiles, which come from the histogram
    (``BUCKET_ERROR``). A few rows per batch and tier, whatever the batch's size, plus the jobs
    not folded yet."""
    figures, by_status, reasons = _read(session, batch_id, tenant_id)
    tiers = {name: TierLine(name) for name in config.tiers}
    escalations = 0
    top = Usage()
    for tier, fig in figures.items():
        v = fig.values
        escalations += int(v["job_escalations"])
        top = Usage(*(a + int(v[t]) for a, t in zip(
            (top.input_tokens, top.output_tokens, top.cache_creation_input_tokens, top.cache_read_input_tokens),
            TOP, strict=True)))
        jobs = int(v["jobs_succeeded"] + v["jobs_failed"] + v["jobs_cancelled"] + v.get("jobs_live", 0))
        if tier == NO_TIER and not any(int(v[f]) for f in FIGURES if f not in (*TOP, "job_escalations")
                                       and not f.startswith("jobs_")):
            continue  # jobs with no tier count in by_status only, as in report.summarize
        line = tiers.setdefault(tier, TierLine(tier))
        line.jobs += jobs if tier != NO_TIER else 0
        line.calls = int(v["calls"])
        line.input_tokens, line.output_tokens = int(v["input_tokens"]), int(v["output_tokens"])
        line.cache_creation_input_tokens = int(v["cache_creation_input_tokens"])
        line.cache_read_input_tokens = int(v["cache_read_input_tokens"])
        line.cost_usd = Decimal(v["cost_usd"])
        line.failed_calls, line.repeated_calls = int(v["failed_calls"]), int(v["repeated_calls"])
        line.repeated_cost_usd = Decimal(v["repeated_cost_usd"])
        line.abandoned_calls = int(v.get("abandoned_calls", 0))
        line.worked, line.escalations = int(v["worked"]), int(v["escalations"])
        line.validations, line.validation_failures = int(v["validations"]), int(v["validations_failed"])
        if fig.hist is not None and any(fig.hist):
            line.p50_latency_ms, line.p95_latency_ms = percentile(fig.hist, 0.5), percentile(fig.hist, 0.95)
    for line in tiers.values():
        line.cache_saving_usd = cache_saving(config, line.tier, read=line.cache_read_input_tokens,
                                             written=line.cache_creation_input_tokens)
    order = {name: i for i, name in enumerate([config.triage_tier, *config.work_tiers])}
    lines = sorted(tiers.values(), key=lambda t: order.get(t.tier, 99))
    top_reasons = sorted(reasons.items(), key=lambda r: (-r[1], r[0]))[:5] if by_status.get("failed") else []
    return Summary(
        jobs=sum(by_status.values()), by_status=by_status, tiers=lines, escalations=escalations,
        validation_failures=sum(t.validation_failures for t in lines),
        cost_usd=sum((t.cost_usd for t in lines), Decimal(0)), top_tier=config.top_tier,
        top_tier_cost_usd=call_cost(config.tier(config.top_tier), top, config=config),
        failure_reasons=[FailureReason(r, n) for r, n in top_reasons])


# -- the dashboard's overview ------------------------------------------------------------------------


@dataclass(frozen=True)
class MinutePoint:
    minute: datetime
    tier: str
    jobs: int  # jobs that ended at this tier in the minute (succeeded, failed or cancelled)
    succeeded: int
    calls: int
    cost_usd: Decimal


def per_minute(session: Session, *, hours: float = 3, tenant_id: int | None = None,
               now: datetime | None = None) -> list[MinutePoint]:
    """Throughput and cost per tier per minute over the last ``hours``, oldest first, from the
    rollups (as of the last fold, a few seconds ago). Minutes with nothing are left out."""
    since = (now or utcnow()) - timedelta(hours=hours)
    rows = session.execute(text(
        "SELECT minute, tier, sum(jobs_succeeded + jobs_failed + jobs_cancelled), sum(jobs_succeeded), sum(calls), "
        f"sum(cost_usd) FROM rollup_minutes WHERE minute >= :since AND {_scope(None, tenant_id)} "
        "GROUP BY 1, 2 ORDER BY 1, 2"), {"since": since, "tenant_id": tenant_id})
    return [MinutePoint(m, t, int(j), int(s), int(c), Decimal(cost)) for m, t, j, s, c, cost in rows]


def ended_since(session: Session, since: datetime) -> dict[str, int]:
    """Jobs that ended since ``since``, by status: the rollups' minutes from the one ``since`` falls
    in (so up to a minute more than asked: the rollups' grain), plus the ended jobs not folded yet.
    What `status` and the overview show as finished in the last minute and 5 minutes; a count of
    the job rows instead would read every job that ended in that window (35,000 a minute on a busy
    pipeline), and without an index on finished_at, every job of the history."""
    out: dict[str, int] = {}
    if dialect_name(session) != "postgresql":
        # The embedded default (SQLite): no rollups' lock to take; its histories are small.
        rows = session.execute(text(
            "SELECT status, count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
            "AND finished_at >= :since GROUP BY status"), {"since": since}).all()
        return {status: int(n) for status, n in rows if n}
    minute = since.replace(second=0, microsecond=0)
    with _no_fold(session):
        folded = session.execute(text(
            "SELECT sum(jobs_succeeded), sum(jobs_failed), sum(jobs_cancelled) FROM rollup_minutes "
            "WHERE minute >= :minute"), {"minute": minute}).one()
        tail = session.execute(text(
            f"SELECT status, count(*) FROM jobs WHERE {UNROLLED_JOBS} AND finished_at >= :since GROUP BY status"),
            {"since": since}).all()
    for status, n in [*zip(("succeeded", "failed", "cancelled"), folded, strict=True), *tail]:
        if n:
            out[status] = out.get(status, 0) + int(n)
    return out


@dataclass(frozen=True)
class TierCost:
    tier: str
    cost_usd: Decimal
    jobs: int  # jobs that ended at this tier


@dataclass(frozen=True)
class CostToday:
    since: datetime  # midnight UTC
    tiers: list[TierCost]
    cost_usd: Decimal
    top_tier: str
    top_tier_cost_usd: Decimal  # the jobs that ended today, every one's last answer priced at the top tier

    @property
    def saving_usd(self) -> Decimal:
        return self.top_tier_cost_usd - self.cost_usd

    @property
    def saving_ratio(self) -> float:
        return float(self.saving_usd / self.top_tier_cost_usd) if self.top_tier_cost_usd else 0.0


def cost_today(session: Session, config: ModelConfig, *, tenant_id: int | None = None,
               now: datetime | None = None) -> CostToday:
    """Cost per tier since midnight UTC (calls by the minute they finished), and what the jobs that
    ended today would have cost at the top tier, as `stats` prices it. From the rollups, as of the
    last fold."""
    now = now or utcnow()
    since = now.replace(hour=0, minute=0, second=0, microsecond=0)
    tiers: list[TierCost] = []
    top = Usage()
    rows = session.execute(text(
        f"SELECT tier, sum(cost_usd), sum(jobs_succeeded + jobs_failed + jobs_cancelled), {_sums(TOP)} "
        f"FROM rollup_minutes WHERE minute >= :since AND {_scope(None, tenant_id)} GROUP BY tier"),
        {"since": since, "tenant_id": tenant_id})
    for tier, cost, jobs, *tokens in rows:
        top = Usage(*(a + int(b or 0) for a, b in zip(
            (top.input_tokens, top.output_tokens, top.cache_creation_input_tokens, top.cache_read_input_tokens),
            tokens, strict=True)))
        if tier != NO_TIER:
            tiers.append(TierCost(tier, Decimal(cost or 0), int(jobs or 0)))
    order = {name: i for i, name in enumerate([config.triage_tier, *config.work_tiers])}
    tiers.sort(key=lambda t: order.get(t.tier, 99))
    return CostToday(since=since, tiers=tiers, cost_usd=sum((t.cost_usd for t in tiers), Decimal(0)),
                     top_tier=config.top_tier,
                     top_tier_cost_usd=call_cost(config.tier(config.top_tier), top, config=config))


# -- batches ---------------------------------------------------------------------------------------


def batch_counts(session: Session, batch_ids: Sequence[int]) -> dict[int, tuple[dict[str, int], Decimal]]:
    """Each batch's jobs per status and its cost so far (its jobs' calls, as `stats` counts them),
    from the rollups and the rows not folded yet: what `batches` shows."""
    out: dict[int, tuple[dict[str, int], Decimal]] = {i: ({}, Decimal(0)) for i in batch_ids}
    if not batch_ids:
        return out
    params = {"ids": list(batch_ids)}

    def add(batch_id: int, status: str | None, n: int, cost: Any) -> None:
        counts, total = out[batch_id]
        if status is not None and n:
            counts[status] = counts.get(status, 0) + int(n)
        out[batch_id] = (counts, total + Decimal(cost or 0))

    with _no_fold(session):
        for batch_id, ok, failed, cancelled, cost in session.execute(text(
                "SELECT batch_id, sum(jobs_succeeded), sum(jobs_failed), sum(jobs_cancelled), sum(cost_usd) "
                "FROM rollup_totals WHERE batch_id = ANY(:ids) GROUP BY 1"), params):
            add(batch_id, "succeeded", ok, cost)
            add(batch_id, "failed", failed, 0)
            add(batch_id, "cancelled", cancelled, 0)
        for batch_id, status, n in session.execute(text(
                f"SELECT batch_id, status, count(*) FROM jobs WHERE batch_id = ANY(:ids) AND status IN "
                f"('queued', 'triaging', 'working', 'validating') GROUP BY 1, 2 "
                f"UNION ALL SELECT batch_id, status, count(*) FROM jobs WHERE {UNROLLED_JOBS} "
                "AND batch_id = ANY(:ids) GROUP BY 1, 2"), params):
            add(batch_id, status, n, 0)
        for batch_id, cost in session.execute(text(
                "SELECT j.batch_id, sum(c.cost_usd) FROM model_calls c JOIN jobs j ON j.id = c.job_id "
                f"WHERE NOT c.rolled_up AND c.stage NOT IN {EVALUATION} AND j.batch_id = ANY(:ids) GROUP BY 1"),
                params):
            add(batch_id, None, 0, cost)
    return out
