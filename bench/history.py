"""Benchmark 4: history queries on 1,000,000 jobs with their calls, decisions, verdicts and events.

The rows are made by Postgres itself (INSERT ... SELECT generate_series), in the proportions a
real run leaves: 100 batches of 10,000 jobs over a month, most succeeded, two or three calls, one
routing decision, one verdict and four events per finished job. Then the four questions the CLI
asks: jobs of a batch with a status, jobs of a tier in a time window, one job's whole story, and
the per-tier stats of a batch. p50 and p95 over many runs with varied arguments, and EXPLAIN of
every statement they send: which tables each reads by index, and any it scans whole. Stats per
tier, whose work grows with the batch, is timed in turn with the floor under it: the same rows
read through the same indexes and only counted (``STATS_FLOOR``).

The queries are ``pipeline.queries.history`` and ``pipeline.queries.report.summarize`` when main has them, else
SQL equivalent to what ``jobs list``, ``jobs show`` and ``stats`` need.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from bench import env
from bench.report import Figure
from pipeline.db import make_engine, session_factory
from pipeline.settings import Settings

NAME = "history"
PER_BATCH = 10_000
T0 = datetime(2026, 10, 1, tzinfo=UTC)
STEP_S = 2.5  # one job every 2.5 s: 1M jobs span a month

GENERATE = [
    "INSERT INTO batches (name, created_at) SELECT 'bench-' || b, :t0 + (b - 1) * (:per * :step) * interval '1 second' "
    "FROM generate_series(1, :nb) b",
    # Jobs: 90% succeeded, 5% failed, 3% queued, 2% working; tiers 70/30 sonnet/opus once routed.
    """INSERT INTO jobs (batch_id, key, kind, payload, status, version, deliveries, difficulty, tier, attempt,
                         escalations, cost_usd, output, error, created_at, updated_at, stage_started_at, finished_at)
       SELECT (SELECT min(id) FROM batches) + (g - 1) / :per, 'k-' || g,
              (ARRAY['classify','extract','draft','generate'])[1 + g % 4],
              jsonb_build_object('text', 'Ticket ' || g || ': I was charged twice',
                                 'labels', '["billing","bug"]'::jsonb),
              st, CASE WHEN st = 'queued' THEN 0 ELSE 4 END, 0,
              CASE WHEN st = 'queued' THEN NULL ELSE (ARRAY['easy','medium','hard'])[1 + g % 3] END,
              CASE WHEN st = 'queued' THEN NULL WHEN (g * 7) % 10 < 7 THEN 'sonnet' ELSE 'opus' END,
              CASE WHEN st = 'queued' THEN 0 ELSE 1 END, CASE WHEN g % 50 = 0 THEN 1 ELSE 0 END,
              CASE WHEN st = 'queued' THEN 0 ELSE 0.0021 END,
              CASE WHEN st = 'succeeded' THEN '{"label": "billing"}'::jsonb END,
              CASE WHEN st = 'failed' THEN 'validation failed at opus after 2 attempt(s)' END,
              t, t + interval '30 seconds', CASE WHEN st = 'working' THEN t + interval '10 seconds' END,
              CASE WHEN st IN ('succeeded', 'failed') THEN t + interval '30 seconds' END
       FROM (SELECT g, :t0 + g * :step * interval '1 second' AS t,
                    CASE WHEN g % 100 < 90 THEN 'succeeded' WHEN g % 100 < 95 THEN 'failed'
                         WHEN g % 100 < 98 THEN 'queued' ELSE 'working' END AS st
             FROM generate_series(1, :n) g) s""",
    # Calls: triage (haiku) and work for every routed job, a format check for one in ten.
    """INSERT INTO model_calls (job_id, stage, tier, model, attempt, delivery, outcome, input_tokens, output_tokens,
                                cache_creation_input_tokens, cache_read_input_tokens, cost_usd, latency_ms, request_id,
                                status_code, stop_reason, response_text, applied, started_at, finished_at)
       SELECT j.id, s.stage, CASE WHEN s.stage = 'work' THEN j.tier ELSE 'haiku' END,
              CASE WHEN s.stage = 'work' THEN 'claude-' || j.tier || '-5-5' ELSE 'claude-haiku-5-5' END,
              1, 1, 'ok', 120 + j.id % 50, 40 + j.id % 30, 0, 0, 0.0007, 400 + (j.id * 37) % 2000,
              'req_' || j.id || s.stage, 200, 'end_turn', '{"label": "billing"}', true,
              j.created_at + s.off * interval '1 second', j.created_at + (s.off + 2) * interval '1 second'
       FROM jobs j CROSS JOIN (VALUES ('triage', 1), ('work', 5), ('format_check', 12)) s(stage, off)
       WHERE j.tier IS NOT NULL AND (s.stage <> 'format_check' OR j.id % 10 = 0)""",
    """INSERT INTO routing_decisions (job_id, reason_kind, verdict, confidence, reason, to_tier, created_at)
       SELECT id, 'triage', difficulty, 0.9, 'Routine job with clear instructions.', tier,
              created_at + interval '3 seconds' FROM jobs WHERE tier IS NOT NULL""",
    """INSERT INTO validation_verdicts (job_id, tier, attempt, validator, ok, problems, created_at)
       SELECT id, tier, 1, 'label', status = 'succeeded', '[]'::jsonb, finished_at
       FROM jobs WHERE finished_at IS NOT NULL""",
    """INSERT INTO job_events (job_id, from_status, to_status, at, detail)
       SELECT j.id, e.frm, CASE WHEN e.too = 'end' THEN j.status ELSE e.too END,
              j.created_at + e.off * interval '1 second', e.detail
       FROM jobs j CROSS JOIN (VALUES ('queued', 'triaging', 0, 'dispatched to triage'),
                                      ('triaging', 'working', 3, 'triage: easy -> sonnet'),
                                      ('working', 'validating', 8, 'sonnet attempt 1 answered'),
                                      ('validating', 'end', 30, 'label ok')) e(frm, too, off, detail)
       WHERE j.finished_at IS NOT NULL""",
]


def generate(engine: Engine, n: int, console: Console) -> None:
    params = {"n": n, "per": PER_BATCH, "nb": (n + PER_BATCH - 1) // PER_BATCH, "t0": T0, "step": STEP_S}
    t0 = time.monotonic()
    with engine.begin() as conn:
        for sql in GENERATE:
            conn.execute(text(sql), params)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    # The generated gigabytes, written out before the queries are timed.
    if why := env.checkpoint(engine):
        console.print(f"  no CHECKPOINT ({why}): the timings may overlap the flush of the generated rows")
    with engine.connect() as conn:
        counts = {t: conn.scalar(text(f"SELECT count(*) FROM {t}")) for t in
                  ("jobs", "model_calls", "routing_decisions", "validation_verdicts", "job_events")}
    made = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    console.print(f"  generated in {time.monotonic() - t0:.0f} s: {made}")


# -- the queries: pipeline.queries.history when it exists, else SQL doing the same work ---------------------

JOB_COLUMNS = ("j.id, j.key, j.kind, j.status, j.tier, j.attempt, j.escalations, j.cost_usd, j.error, "
               "j.created_at, j.finished_at, b.name")


def _sql_queries() -> dict[str, Callable[[Session, random.Random, int], Any]]:
    def by_batch_status(s: Session, rng: random.Random, n: int) -> Any:
        batch = 1 + rng.randrange(max(1, n // PER_BATCH))
        status = rng.choice(["failed", "succeeded", "queued"])
        return s.execute(text(f"SELECT {JOB_COLUMNS} FROM jobs j JOIN batches b ON b.id = j.batch_id "
                              "WHERE j.batch_id = :b AND j.status = :s ORDER BY j.id DESC LIMIT 50"),
                         {"b": batch, "s": status}).all()

    def by_tier_time(s: Session, rng: random.Random, n: int) -> Any:
        start = T0 + timedelta(seconds=rng.uniform(0, n * STEP_S - 3600))
        return s.execute(text(f"SELECT {JOB_COLUMNS} FROM jobs j JOIN batches b ON b.id = j.batch_id "
                              "WHERE j.tier = :t AND j.created_at >= :a AND j.created_at < :z "
                              "ORDER BY j.id DESC LIMIT 50"),
                         {"t": rng.choice(["sonnet", "opus"]), "a": start, "z": start + timedelta(hours=1)}).all()

    def story(s: Session, rng: random.Random, n: int) -> Any:
        job_id = 1 + rng.randrange(n)
        out = [s.execute(text(f"SELECT {JOB_COLUMNS}, j.payload, j.metadata, j.output FROM jobs j "
                              "JOIN batches b ON b.id = j.batch_id WHERE j.id = :id"), {"id": job_id}).all()]
        for table in ("model_calls", "routing_decisions", "validation_verdicts", "job_events"):
            out.append(s.execute(text(f"SELECT * FROM {table} WHERE job_id = :id ORDER BY id"), {"id": job_id}).all())
        return out

    def stats(s: Session, rng: random.Random, n: int) -> Any:
        batch = 1 + rng.randrange(max(1, n // PER_BATCH))
        return [
            s.execute(text("SELECT status, count(*) FROM jobs WHERE batch_id = :b GROUP BY status"),
                      {"b": batch}).all(),
            s.execute(text("SELECT tier, count(*) FROM jobs WHERE batch_id = :b AND tier IS NOT NULL GROUP BY tier"),
                      {"b": batch}).all(),
            s.execute(text("SELECT c.tier, count(*), sum(c.input_tokens), sum(c.output_tokens), sum(c.cost_usd), "
                           "percentile_cont(0.5) WITHIN GROUP (ORDER BY c.latency_ms), "
                           "percentile_cont(0.95) WITHIN GROUP (ORDER BY c.latency_ms) "
                           "FROM model_calls c JOIN jobs j ON j.id = c.job_id WHERE j.batch_id = :b GROUP BY c.tier"),
                      {"b": batch}).all(),
        ]

    return {"jobs by batch and status": by_batch_status, "jobs by tier and time range": by_tier_time,
            "one job's full story": story, "stats per tier (one batch)": stats}


def _real_queries() -> dict[str, Callable[[Session, random.Random, int], Any]] | None:
    try:
        from pipeline.queries.history import JobFilters, get_job, list_jobs
        from pipeline.queries.report import summarize
    except ImportError:
        return None
    from pipeline.models import JobStatus

    config = Settings().models

    def by_batch_status(s: Session, rng: random.Random, n: int) -> Any:
        batch = str(1 + rng.randrange(max(1, n // PER_BATCH)))
        status = JobStatus(rng.choice(["failed", "succeeded", "queued"]))
        return list_jobs(db_session=s, filters=JobFilters(batch=batch, status=(status,)), limit=50)

    def by_tier_time(s: Session, rng: random.Random, n: int) -> Any:
        start = T0 + timedelta(seconds=rng.uniform(0, n * STEP_S - 3600))
        return list_jobs(db_session=s, filters=JobFilters(tier=rng.choice(["sonnet", "opus"]), since=start,
                                                           until=start + timedelta(hours=1)), limit=50)

    def story(s: Session, rng: random.Random, n: int) -> Any:
        return get_job(db_session=s, job_id=1 + rng.randrange(n))

    def stats(s: Session, rng: random.Random, n: int) -> Any:
        # The raw rows, as stats read them before the rollups (a time window sends summarize down
        # that path; this one covers every job): the rows here are never folded, and the rollups'
        # own figures are bench/rollups.py's.
        return summarize(s, config, batch_id=1 + rng.randrange(max(1, n // PER_BATCH)),
                         since=T0 - timedelta(days=1), until=T0 + timedelta(days=3650))

    return {"jobs by batch and status": by_batch_status, "jobs by tier and time range": by_tier_time,
            "one job's full story": story, "stats per tier (one batch)": stats}


# -- the floor: the rows a query must read, read and nothing else ----------------------------------

# Stats per tier aggregates every call, verdict and job of a batch (some 50,000 rows for 10,000
# jobs), so unlike the other three it cannot be made cheap by an index alone: its time grows with
# the batch. This statement reads the same rows through the same indexes, one column of each row
# from the heap as the stats need, and only counts them. Timed beside the stats with the same
# batch, it is the part of their time that no rewrite of the aggregation can remove, measured on
# the machine as it is during the run; the ratio is what the aggregation itself costs on top.
STATS_FLOOR = text(
    "WITH r AS (SELECT count(status) AS n, min(id) AS lo, max(id) AS hi FROM jobs WHERE batch_id = :b) "
    "SELECT r.n, (SELECT count(tier) FROM model_calls WHERE job_id BETWEEN r.lo AND r.hi), "
    "(SELECT count(tier) FROM validation_verdicts WHERE job_id BETWEEN r.lo AND r.hi), "
    "(SELECT count(input_tokens) FROM model_calls WHERE stage = 'work' AND job_id BETWEEN r.lo AND r.hi) FROM r")


def _stats_floor(s: Session, rng: random.Random, n: int) -> Any:
    # The same draw as the stats query's, so that with a generator seeded alike both read one batch.
    return s.execute(STATS_FLOOR, {"b": 1 + rng.randrange(max(1, n // PER_BATCH))}).one()


FLOORS: dict[str, tuple[str, Callable[[Session, random.Random, int], Any]]] = {
    "stats per tier (one batch)": ("reading its rows, no aggregation", _stats_floor),
}


# -- EXPLAIN ---------------------------------------------------------------------------------------

# "Indexes serve it" means, in EXPLAIN ANALYZE of every statement the query sends, for each of
# EXPLAIN_DRAWS draws of its arguments (one draw can be lucky: a plan may go bad only for some
# windows or batches):
# - no sequential scan that reads more than SMALL_SCAN_ROWS rows (over all its loops): the batches,
#   tenants and tasks a query joins have a handful of rows here, where a sequential scan is what
#   the planner should choose; any scan of jobs or of a per-call table reads far more;
# - at most MAX_FILTERED rows read and then thrown away by a filter, or by the recheck of a
#   B-tree bitmap that went lossy, summed over every loop of every node. An index that only
#   orders the rows (the primary key, walked backwards) while a filter selects them is not an
#   index serving the query.
# - A BRIN index is lossy by design: it keeps one summary per range of pages_per_range pages, so
#   a bitmap heap scan through it rechecks every row of each range it returns, and throws away the
#   rows outside the window at both ends. Those rows are counted apart ("BRIN recheck") and allowed
#   up to two ranges' worth of pages a scan; a BRIN scan that throws away more than that is
#   reading ranges the window is not in (the table's physical order no longer follows the
#   column, or the plan leans on the BRIN for a condition it cannot check), and fails.
EXPLAIN_DRAWS = 5
MAX_FILTERED = 1000
SMALL_SCAN_ROWS = 1000


@dataclass
class _PlanCheck:
    brin: dict[str, int]  # BRIN index name -> pages_per_range
    scans: set[str] = field(default_factory=set)
    seq: set[str] = field(default_factory=set)
    filtered: int = 0
    brin_recheck: int = 0
    brin_excess: list[str] = field(default_factory=list)

    def walk(self, node: dict[str, Any]) -> None:
        kind, loops = node["Node Type"], node.get("Actual Loops", 1)
        table = node.get("Relation Name")
        removed = round(node.get("Rows Removed by Filter", 0) * loops)
        recheck = round(node.get("Rows Removed by Index Recheck", 0) * loops)
        if kind == "Seq Scan":
            self.scans.add(f"{table}: {'Parallel ' if node.get('Parallel Aware') else ''}Seq Scan")
            if round((node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops) > SMALL_SCAN_ROWS:
                self.seq.add(str(table))
        elif kind in ("Index Scan", "Index Only Scan"):
            backward = " Backward" if node.get("Scan Direction") == "Backward" else ""
            self.scans.add(f"{table}: {kind}{backward} {node['Index Name']}")
        elif kind == "Bitmap Heap Scan":
            indexes = sorted(_bitmap_indexes(node))
            self.scans.add(f"{table}: Bitmap Heap Scan ({', '.join(indexes)})")
            ranges = [self.brin[i] for i in indexes if i in self.brin]
            if ranges and recheck:
                self.brin_recheck += recheck
                # The pages whose rows were all thrown away: the heap pages read, in the share of
                # rows read that the recheck discarded.
                read = node["Actual Rows"] * loops + recheck + removed
                pages = node.get("Exact Heap Blocks", 0) + node.get("Lossy Heap Blocks", 0)
                wasted = pages * recheck / read if read else 0
                if wasted > 2 * max(ranges):
                    self.brin_excess.append(f"{table}: {wasted:.0f} pages rechecked for nothing")
                recheck = 0
        self.filtered += removed + recheck
        for child in node.get("Plans", []):
            self.walk(child)


def _bitmap_indexes(node: dict[str, Any]) -> set[str]:
    names = {node["Index Name"]} if node["Node Type"] == "Bitmap Index Scan" else set()
    for child in node.get("Plans", []):
        if child["Node Type"] in ("Bitmap Index Scan", "BitmapAnd", "BitmapOr"):
            names |= _bitmap_indexes(child)
    return names


def _brin_indexes(conn: Any) -> dict[str, int]:
    rows = conn.execute(text(
        "SELECT c.relname, coalesce((SELECT split_part(o, '=', 2)::int FROM unnest(c.reloptions) o "
        "WHERE o LIKE 'pages_per_range=%'), 128) FROM pg_class c JOIN pg_am a ON a.oid = c.relam "
        "WHERE a.amname = 'brin'"))
    return {name: int(ppr) for name, ppr in rows}


def explain(engine: Engine, fn: Callable[[Session, random.Random, int], Any], n: int) -> dict[str, Any]:
    """Run ``fn`` for EXPLAIN_DRAWS draws of its arguments, capture the statements each sends, and
    EXPLAIN ANALYZE each with its parameters. Counts are the worst draw's."""
    with engine.connect() as conn:
        brin = _brin_indexes(conn)
    checks: list[_PlanCheck] = []
    statements = 0
    for draw in range(EXPLAIN_DRAWS):
        captured: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool,
                    into: list[tuple[str, Any]] = captured) -> None:
            into.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            with session_factory(engine)() as s:
                fn(s, random.Random(7 + draw), n)
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        check = _PlanCheck(brin)
        with engine.connect() as conn:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for statement, parameters in captured:
                cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
                check.walk(cursor.fetchone()[0][0]["Plan"])
        checks.append(check)
        statements = max(statements, len(captured))
    worst = max(checks, key=lambda c: c.filtered)
    return {"statements": statements, "draws": EXPLAIN_DRAWS,
            "scans": sorted(set().union(*(c.scans for c in checks))),
            "seq_scans": sorted(set().union(*(c.seq for c in checks))),
            "rows_removed_by_filter": worst.filtered,
            "brin_recheck_rows": max(c.brin_recheck for c in checks),
            "brin_excess": sorted({e for c in checks for e in c.brin_excess})}


def _timed(sessions: Callable[[], Session], fns: list[Callable[[Session, random.Random, int], Any]], n: int,
           runs: int) -> list[list[float]]:
    """Milliseconds of each of ``runs`` calls of each of ``fns``, after one call each to warm the
    connection and the statement caches. The calls alternate, one of each per run, and each
    function draws its arguments from its own generator seeded alike: functions that draw the same
    way meet the same arguments and the same machine (these VMs' speed drifts by half within
    minutes, so timing one after the other would compare two machines)."""
    rngs = [random.Random(1) for _ in fns]
    times: list[list[float]] = [[] for _ in fns]
    with sessions() as s:
        for fn in fns:
            fn(s, random.Random(0), n)
        for _ in range(runs):
            for fn, rng, out in zip(fns, rngs, times, strict=True):
                t0 = time.perf_counter()
                fn(s, rng, n)
                out.append((time.perf_counter() - t0) * 1000)
                s.rollback()
    return times


def _p50_p95(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), statistics.quantiles(times, n=20)[18]


def run(*, quick: bool, console: Console, profile: bool = False, jobs: int | None = None,
        runs: int | None = None) -> list[Figure]:
    n = jobs or (100_000 if quick else 1_000_000)
    runs = runs or (60 if quick else 100)
    real = _real_queries()
    source = ("pipeline.queries.history" if real
              else "SQL equivalent to jobs list/show/stats (pipeline.queries.history not on main)")
    console.print(f"[bold]history[/]: {n:,} jobs; {runs} runs of each query; through {source}")
    figures: list[Figure] = []
    with env.scratch_database() as db:
        engine = make_engine(db, pool_size=2)
        generate(engine, n, console)
        sessions = session_factory(engine)
        for name, fn in (real or _sql_queries()).items():
            floor_name, floor = FLOORS.get(name, ("", None))
            times, *floor_times = _timed(sessions, [fn] if floor is None else [fn, floor], n, runs)
            p50, p95 = _p50_p95(times)
            floor_extra: dict[str, float] = {}
            if floor_times:
                floor_p50, floor_p95 = _p50_p95(floor_times[0])
                floor_extra = {"floor_p50_ms": floor_p50, "floor_p95_ms": floor_p95}
                console.print(f"  {name}: {floor_name}, timed in turn with it: "
                              f"p50 {floor_p50:.1f} ms, p95 {floor_p95:.1f} ms")
            plan = explain(engine, fn, n)
            indexed = (not plan["seq_scans"] and plan["rows_removed_by_filter"] <= MAX_FILTERED
                       and not plan["brin_excess"])
            console.print(f"  {name}: p50 {p50:.1f} ms, p95 {p95:.1f} ms; {plan['statements']} statement(s); "
                          f"{'; '.join(plan['scans'])}; rows removed by filter {plan['rows_removed_by_filter']:,}, "
                          f"BRIN recheck {plan['brin_recheck_rows']:,} (worst of {plan['draws']} draws)"
                          + (f"; BRIN over-reads: {', '.join(plan['brin_excess'])}" if plan["brin_excess"] else ""))
            figures.append(Figure(NAME, f"{name}: p95 (p50 {p50:.1f} ms)", p95, "ms",
                                  baseline=floor_extra.get("floor_p95_ms"),
                                  baseline_name=floor_name, target=20, target_kind="<",
                                  note="" if indexed else f"seq scans: {', '.join(plan['seq_scans']) or 'none'}; "
                                                          f"rows removed by filter: {plan['rows_removed_by_filter']:,}"
                                                          + "".join(f"; {e}" for e in plan["brin_excess"]),
                                  extra={"p50_ms": p50, "p95_ms": p95, "runs": runs, "jobs": n, "source": source,
                                         **floor_extra, **plan}))
            figures.append(Figure(NAME, f"{name}: EXPLAIN: indexes serve it", 1.0 if indexed else 0.0, "", target=1,
                                  target_kind=">=", note="; ".join(plan["scans"])))
        engine.dispose()
    return figures
