"""Check that the job-history queries use their indexes at scale.

    .venv/bin/python scripts/explain_history.py postgresql://postgres@127.0.0.1/SCRATCH_DB --seed 1000000

With --seed N it first builds the schema and N jobs (10 batches, ~2% failed, ~1% queued, ~1%
cancelled, a third on opus) with plain SQL. Then it runs each query of pipeline/queries/history.py the
way the CLI does, captures the SQL it sends, and prints EXPLAIN (ANALYZE, BUFFERS) for each
SELECT: the plan's index names and the time it took. A scratch database only: it writes rows.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, text

from pipeline import migrate
from pipeline.db import make_engine, session_factory
from pipeline.models import JobKind, JobStatus
from pipeline.queries import history

SEED = """
INSERT INTO batches (name, created_at)
SELECT 'big-' || b, timestamptz '2026-01-01' + b * interval '1 day' FROM generate_series(1, 10) b;
INSERT INTO jobs (batch_id, key, kind, payload, status, tier, cost_usd, created_at, updated_at)
SELECT bt.id, 'job-' || lpad(g::text, 7, '0'), (ARRAY['classify','extract','draft','generate'])[1 + g % 4],
       '{"prompt": "x"}'::jsonb,
       CASE WHEN g % 50 = 0 THEN 'failed' WHEN g % 97 = 0 THEN 'queued' WHEN g % 101 = 0 THEN 'cancelled'
            ELSE 'succeeded' END,
       CASE WHEN g % 97 = 0 THEN NULL WHEN g % 3 = 0 THEN 'opus' ELSE 'sonnet' END,
       0.001, bt.created_at + g * interval '1 second', bt.created_at + g * interval '1 second'
FROM batches bt CROSS JOIN generate_series(1, :per_batch) g
ORDER BY bt.id, g;
ANALYZE;
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("database_url")
    ap.add_argument("--seed", type=int, default=0, help="jobs to create first (0: use what is there)")
    args = ap.parse_args()

    engine = make_engine(args.database_url)
    if args.seed:
        migrate.upgrade(args.database_url)
        with engine.begin() as conn:
            for stmt in SEED.split(";"):
                if stmt.strip():
                    conn.execute(text(stmt), {"per_batch": args.seed // 10})
    captured: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and not statement.lstrip().upper().startswith(
                "SELECT PG_"):
            captured.append((statement, parameters))

    sessions = session_factory(engine)
    with sessions() as s:
        some_id = s.scalar(text("SELECT id FROM jobs WHERE batch_id = (SELECT id FROM batches WHERE name = 'big-5') "
                                "ORDER BY id LIMIT 1 OFFSET 5000"))
        # A window of one hour in the middle of big-5.
        since = s.scalar(text("SELECT created_at FROM jobs WHERE id = :id"), {"id": some_id})
    deep = history.encode_cursor(some_id)
    F = history.JobFilters
    queries: list[tuple[str, Callable[[Any], Any]]] = [
        ("jobs list --batch (first page)", lambda s: history.list_jobs(db_session=s, filters=F(batch="big-5"))),
        ("jobs list --batch --cursor (deep page)",
         lambda s: history.list_jobs(db_session=s, filters=F(batch="big-5"), cursor=deep)),
        ("jobs list --batch --status failed",
         lambda s: history.list_jobs(db_session=s, filters=F(batch="big-5", status=(JobStatus.FAILED,)))),
        ("jobs list --status failed (all batches)",
         lambda s: history.list_jobs(db_session=s, filters=F(status=(JobStatus.FAILED,)))),
        ("jobs list --status queued --status cancelled",
         lambda s: history.list_jobs(db_session=s, filters=F(status=(JobStatus.QUEUED, JobStatus.CANCELLED)))),
        ("jobs list --batch --key-prefix",
         lambda s: history.list_jobs(db_session=s, filters=F(batch="big-5", key_prefix="job-00420"))),
        ("jobs list --key-prefix (all batches)",
         lambda s: history.list_jobs(db_session=s, filters=F(key_prefix="job-004201"))),
        ("jobs list --since/--until (1 h window)",
         lambda s: history.list_jobs(db_session=s, filters=F(since=since, until=since + (since - since).__class__(
             hours=1)))),
        ("jobs list --batch --tier opus --kind draft",
         lambda s: history.list_jobs(db_session=s, filters=F(batch="big-5", tier="opus", kind=JobKind.DRAFT))),
        ("jobs list (no filter)", lambda s: history.list_jobs(db_session=s)),
        ("jobs show", lambda s: history.get_job(db_session=s, job_id=some_id)),
        ("batches", lambda s: history.list_batches(db_session=s)),
        ("enqueue --wait (batch_progress)",
         lambda s: history.batch_progress(db_session=s, batch_id=history.find_batch(db_session=s, batch="big-5").id)),
        ("export (first chunk)", lambda s: next(history.iter_results(
            db_session=s, batch_id=history.find_batch(db_session=s, batch="big-5").id))),
    ]
    cancel_sql = ("SELECT jobs.id FROM jobs WHERE jobs.batch_id = %(b)s AND jobs.status = 'queued' ORDER BY jobs.id "
                  "LIMIT 5000 FOR UPDATE SKIP LOCKED")
    with engine.connect() as conn:
        total = conn.scalar(text("SELECT count(*) FROM jobs"))
        print(f"jobs in the table: {total:,}\n")
    for title, fn in queries:
        captured.clear()
        with sessions() as s:
            fn(s)
        with engine.connect() as conn:
            for statement, params in captured:
                if "FROM batches" in statement and "jobs" not in statement:
                    continue  # the batch-name lookup: a unique index on a tiny table
                _explain(conn, title, statement, params)
    with engine.connect() as conn:
        b = conn.scalar(text("SELECT id FROM batches WHERE name = 'big-5'"))
        _explain(conn, "cancel (select the queued jobs of a batch)", cancel_sql, {"b": b})


def _explain(conn: Any, title: str, statement: str, params: Any) -> None:
    plan = [r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)]
    indexes = sorted(set(re.findall(r"(?:Index|Index Only|Bitmap Index) Scan(?: Backward)? on (\w+)|using (\w+)",
                                    "\n".join(plan))))
    names = sorted({a or b for a, b in indexes})
    seq = any("Seq Scan on jobs" in line for line in plan)
    took = next((line for line in plan if line.startswith("Execution Time")), "")
    print(f"== {title}: {', '.join(names) or '(no index)'}{'  SEQ SCAN on jobs' if seq else ''}  [{took}]")
    for line in plan:
        print("   " + line)
    print()


if __name__ == "__main__":
    main()
