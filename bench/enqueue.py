"""Benchmark 3: enqueue speed. A JSON Lines file of 200,000 jobs, timed until it is durable in
Postgres (``enqueue_file`` returns after its last commit), against COPY of the same rows into a
bare table (no index, no constraint) — the fastest way Postgres takes rows in. Both in this
process, both reading and parsing the same file, in alternate rounds on emptied tables.

The baseline parses with the standard json module and COPYs text, as it always has, so its figure
stays comparable from run to run. switchyard itself now decodes with orjson and COPYs binary; the
same baseline with those tools is measured too and printed beside it (``copy_fast``, not the
target's baseline), so nobody mistakes the ratio for one against the fastest client."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import orjson
import psycopg
from psycopg.types.json import set_json_dumps
from rich.console import Console
from sqlalchemy import text

from bench import env
from bench.jobs import job_of_kind
from bench.report import Figure
from pipeline.db import make_engine, session_factory
from pipeline.intake.enqueue import enqueue_file
from pipeline.settings import Settings

NAME = "enqueue"
LABELS = ["billing", "bug", "account", "other"]
SCHEMA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}


def write_file(path: Path, n: int) -> Path:
    """A realistic mix of the four kinds, a few pinned, some with metadata."""
    with path.open("w") as fh:
        for i in range(n):
            job = job_of_kind(i, ("classify", "extract", "draft", "generate")[i % 4], "", labels=LABELS,
                              schema=SCHEMA)
            if i % 10 == 0:
                job["metadata"] = {"customer": f"c-{i % 997}", "priority": i % 3}
            if i % 25 == 0:
                job["tier"] = "sonnet"
            fh.write(json.dumps(job) + "\n")
    return path


BARE = """CREATE TABLE IF NOT EXISTS bench_copy (batch_id bigint, key text, kind text, payload jsonb, metadata jsonb,
                                                pinned_tier text)"""
_NOT_PAYLOAD = {"key", "kind", "tier", "metadata"}


def copy_baseline(dsn: str, path: Path) -> float:
    """COPY the same rows into a bare table: read, parse, and stream them through the driver."""
    t0 = time.monotonic()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, path.open("rb") as fh:
        with cur.copy("COPY bench_copy (batch_id, key, kind, payload, metadata, pinned_tier) FROM STDIN") as copy:
            for line in fh:
                job = json.loads(line)
                payload = {k: v for k, v in job.items() if k not in _NOT_PAYLOAD}
                meta = job.get("metadata")
                copy.write_row((1, job.get("key"), job["kind"], json.dumps(payload),
                                json.dumps(meta) if meta is not None else None, job.get("tier")))
        conn.commit()
    return time.monotonic() - t0


def copy_baseline_fast(dsn: str, path: Path) -> float:
    """The same rows, parsed with orjson and sent as a binary COPY, as switchyard sends them."""
    t0 = time.monotonic()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, path.open("rb") as fh:
        set_json_dumps(lambda text: text, context=cur)  # the JSON below is text already
        with cur.copy("COPY bench_copy (batch_id, key, kind, payload, metadata, pinned_tier) FROM STDIN "
                      "(FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "text", "jsonb", "jsonb", "text"])
            for line in fh:
                job = orjson.loads(line)
                payload = {k: v for k, v in job.items() if k not in _NOT_PAYLOAD}
                meta = job.get("metadata")
                copy.write_row((1, job.get("key"), job["kind"], orjson.dumps(payload).decode(),
                                orjson.dumps(meta).decode() if meta is not None else None, job.get("tier")))
        conn.commit()
    return time.monotonic() - t0


# Each side is timed this many times, alternately, on emptied tables; the figure is the median of
# each. One timing of a few seconds swung by half between consecutive runs on these VMs (ratios of
# 0.38 and 0.60 for the same code, minutes apart).
ROUNDS = 3


def run(*, quick: bool, console: Console, profile: bool = False, jobs: int | None = None,
        rounds: int = ROUNDS) -> list[Figure]:
    n = jobs or (20_000 if quick else 200_000)
    console.print(f"[bold]enqueue[/]: a {n:,}-job JSON Lines file until durable, against COPY into a bare table; "
                  f"{rounds} rounds")
    copy_s: list[float] = []
    sy_s: list[float] = []
    fast_s: list[float] = []
    with env.scratch_database() as db, env.workdir() as wd:
        path = write_file(wd / "jobs.jsonl", n)
        engine = make_engine(db, pool_size=2)
        with engine.begin() as conn:
            conn.execute(text(BARE))
        dsn = db.replace("postgresql+psycopg://", "postgresql://")
        settings = Settings(DATABASE_URL=db)
        sessions = session_factory(engine)

        if why := env.checkpoint(engine):
            console.print(f"  no CHECKPOINT ({why}): a side may pay for flushing what was written before it")

        def fresh() -> None:
            # Empty tables, and no dirty pages left for the side about to be timed to flush: not the
            # previous benchmark's, not the other side's.
            with engine.begin() as conn:
                conn.execute(text("TRUNCATE bench_copy, batches, jobs CASCADE"))
            env.checkpoint(engine)

        for r in range(rounds):
            fresh()
            copy_s.append(copy_baseline(dsn, path))
            fresh()
            t0 = time.monotonic()
            profiler = None
            if profile and r == 0:
                from pyinstrument import Profiler

                profiler = Profiler()
                profiler.start()
            report = enqueue_file(sessions, path, batch="bench-enqueue", config=settings.models)
            sy_s.append(time.monotonic() - t0)
            if profiler is not None:
                profiler.stop()
                console.print(profiler.output_text(color=False, show_all=False))
            assert report.accepted == n, report
            fresh()
            fast_s.append(copy_baseline_fast(dsn, path))
            console.print(f"  round {r + 1}: COPY {n / copy_s[-1]:,.0f} jobs/s, switchyard {n / sy_s[-1]:,.0f} "
                          f"jobs/s (ratio {copy_s[-1] / sy_s[-1]:.2f}); COPY with switchyard's tools "
                          f"{n / fast_s[-1]:,.0f} jobs/s")
        engine.dispose()
    copy_m, sy_m, fast_m = (statistics.median(x) for x in (copy_s, sy_s, fast_s))
    console.print(f"  medians: COPY {n / copy_m:,.0f} jobs/s ({copy_m:.1f} s); switchyard {n / sy_m:,.0f} jobs/s "
                  f"({sy_m:.1f} s); COPY with orjson and binary rows, switchyard's own tools: {n / fast_m:,.0f} "
                  f"jobs/s, ratio {fast_m / sy_m:.2f}")
    return [Figure(NAME, f"jobs/s, {n:,}-job file until durable", n / sy_m, "jobs/s", baseline=n / copy_m,
                   baseline_name="COPY, bare table", target=0.5,
                   extra={"jobs": n, "rounds": rounds, "switchyard_s": sy_m, "copy_s": copy_m, "copy_fast_s": fast_m,
                          "switchyard_s_each": sy_s, "copy_s_each": copy_s, "copy_fast_s_each": fast_s})]
