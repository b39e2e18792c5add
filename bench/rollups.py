"""Benchmark: `stats` of one batch at 10,000, 100,000 and 1,000,000 jobs, read from the rollups,
and the dashboard overview's queries over that history.

The rows are made by Postgres itself (INSERT ... SELECT generate_series), as the history benchmark
makes its own: one batch of each size, finished, its jobs ending at 35 a second (a busy pipeline)
so that the largest batch spans eight hours and the three end now; two or three calls, a verdict
and for one job in fifty an escalation each. The rollups are then built by the real code
(``rollups.rebuild``, what `switchyard db rebuild-rollups` runs), and timed:

- ``report.summarize(batch_id=...)``, what `stats --batch` and ``/v1/stats`` call, for each size
  in turn (one call of each per round, so a slow minute of the machine hits every size alike);
- the overview: ``rollups.per_minute`` (the last 3 hours) and ``rollups.cost_today`` together;
- and for reference the raw path, which read every call (``summarize`` with a time window covering
  the batch), on the smallest batch only.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Callable
from datetime import timedelta

from rich.console import Console
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from bench import env
from bench.report import Figure
from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory
from pipeline.models import utcnow
from pipeline.queries import rollups
from pipeline.queries.report import summarize
from pipeline.settings import Settings

NAME = "rollups"
RATE = 35.0  # jobs ending per second

_JOBS = """
INSERT INTO jobs (batch_id, key, kind, payload, status, version, difficulty, tier, attempt, escalations, cost_usd,
                  output, error, failure_reason, created_at, updated_at, finished_at)
SELECT :b, 'k-' || g, 'classify', jsonb_build_object('text', 'Ticket ' || g || ': I was charged twice'),
       st, 4, (ARRAY['easy','medium','hard'])[1 + g % 3], CASE WHEN g % 10 < 7 THEN 'sonnet' ELSE 'opus' END, 1,
       CASE WHEN g % 50 = 0 THEN 1 ELSE 0 END, 0.0021,
       CASE WHEN st = 'succeeded' THEN '{"label": "billing"}'::jsonb END,
       CASE WHEN st = 'failed' THEN 'validation failed at opus after 2 attempt(s)' END,
       CASE WHEN st = 'failed' THEN 'validation failed at opus' END,
       t - interval '30 seconds', t, t
FROM (SELECT g, CAST(:end AS timestamptz) - (:n - g) / :rate * interval '1 second' AS t,
             CASE WHEN g % 100 < 95 THEN 'succeeded' ELSE 'failed' END AS st
      FROM generate_series(1, :n) g) s"""
_CALLS = """
INSERT INTO model_calls (job_id, stage, tier, model, attempt, delivery, outcome, input_tokens, output_tokens,
                         cache_creation_input_tokens, cache_read_input_tokens, cost_usd, latency_ms, request_id,
                         status_code, stop_reason, applied, started_at, finished_at)
SELECT j.id, s.stage, CASE WHEN s.stage = 'work' THEN j.tier ELSE 'haiku' END, 'claude', 1, 1,
       CASE WHEN j.id % 97 = 0 THEN 'error' ELSE 'ok' END, 120 + j.id % 50, 40 + j.id % 30, 0, j.id % 7 * 100,
       0.0007, 400 + (j.id * 37) % 2000, 'req_' || j.id || s.stage, 200, 'end_turn', true,
       j.finished_at - s.off * interval '1 second', j.finished_at - (s.off - 2) * interval '1 second'
FROM jobs j CROSS JOIN (VALUES ('triage', 25), ('work', 20), ('format_check', 8)) s(stage, off)
WHERE j.batch_id = :b AND (s.stage <> 'format_check' OR j.id % 10 = 0)"""
_DECISIONS = """
INSERT INTO routing_decisions (job_id, reason_kind, verdict, confidence, reason, from_tier, to_tier, created_at)
SELECT id, 'escalation', NULL, NULL, 'validation failed at sonnet', 'sonnet', 'opus', finished_at
FROM jobs WHERE batch_id = :b AND escalations > 0"""
_VERDICTS = """
INSERT INTO validation_verdicts (job_id, tier, attempt, validator, ok, problems, created_at)
SELECT id, tier, 1, 'label', status = 'succeeded', '[]'::jsonb, finished_at FROM jobs WHERE batch_id = :b"""


def generate(engine: Engine, sizes: list[int], console: Console) -> dict[int, int]:
    """One finished batch per size, ending now; batch size -> batch id."""
    t0 = time.monotonic()
    end = utcnow()
    out: dict[int, int] = {}
    with engine.begin() as conn:
        for n in sizes:
            b = conn.execute(text("INSERT INTO batches (name) VALUES (:name) RETURNING id"),
                             {"name": f"bench-{n}"}).scalar_one()
            for sql in (_JOBS, _CALLS, _DECISIONS, _VERDICTS):
                conn.execute(text(sql), {"b": b, "n": n, "end": end, "rate": RATE})
            out[n] = b
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
        calls = conn.scalar(text("SELECT count(*) FROM model_calls"))
    console.print(f"  generated {sum(sizes):,} jobs and {calls:,} calls in {time.monotonic() - t0:.0f} s")
    return out


def overview_page(database_url: str, config: ModelConfig) -> Callable[[], object]:
    """GET /ui/ as an operator signed in to the dashboard sees it: the app in this process (its
    queries, Redis reads and template), through Starlette's test client, so the time is the
    server's, with no network or browser in it."""
    from fastapi.testclient import TestClient

    from pipeline import tenants
    from pipeline.api.app import create_app

    app = create_app(database_url=database_url, broker_url=env.broker_url(), models=config, tier_limits={},
                     rate_window_s=60, max_body_bytes=1 << 20, max_batch_jobs=1000, pool_size=2,
                     ui_secret="bench-secret")
    engine = make_engine(database_url, pool_size=1)
    with session_factory(engine)() as s:
        token = tenants.create_token(s, "bench-operator", operator=True).token
        s.commit()
    engine.dispose()
    client = TestClient(app)
    form = client.get("/ui/login")
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', form.text)
    assert nonce is not None, "the sign-in page has no CSRF field"
    signed_in = client.post("/ui/login", data={"token": token, "login_csrf": nonce.group(1)}, follow_redirects=False)
    if signed_in.status_code != 303:
        raise RuntimeError(f"sign-in to the dashboard answered {signed_in.status_code}")

    def get() -> object:
        r = client.get("/ui/")
        if r.status_code != 200 or "Overview" not in r.text:
            raise RuntimeError(f"GET /ui/ answered {r.status_code}")
        return r
    return get


def _p50_p95(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), statistics.quantiles(times, n=20)[18]


def run(*, quick: bool, console: Console, profile: bool = False, sizes: list[int] | None = None,
        runs: int | None = None) -> list[Figure]:
    sizes = sizes or ([1_000, 10_000, 100_000] if quick else [10_000, 100_000, 1_000_000])
    runs = runs or (40 if quick else 100)
    config = Settings().models
    console.print(f"[bold]rollups[/]: stats of one batch at {', '.join(f'{n:,}' for n in sizes)} jobs; "
                  f"{runs} runs of each")
    figures: list[Figure] = []
    with env.scratch_database() as db:
        engine = make_engine(db, pool_size=2)
        batches = generate(engine, sizes, console)
        sessions = session_factory(engine)
        t0 = time.monotonic()
        with sessions() as s:
            built = rollups.rebuild(s)
        rebuild_s = time.monotonic() - t0
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            rows = conn.scalar(text("SELECT count(*) FROM rollup_minutes"))
        console.print(f"  rebuild-rollups: {built.jobs:,} jobs and {built.calls:,} calls folded in {rebuild_s:.0f} s "
                      f"({rows:,} rows per minute)")
        if why := env.checkpoint(engine):
            console.print(f"  no CHECKPOINT ({why}): the timings may overlap the flush of the generated rows")

        def stats_of(n: int) -> Callable[[Session], object]:
            def fn(s: Session) -> object:
                return summarize(s, config, batch_id=batches[n])
            return fn

        def overview(s: Session) -> object:
            return rollups.per_minute(s, hours=3), rollups.cost_today(s, config)

        smallest = min(sizes)
        window = (utcnow() - timedelta(days=30), utcnow() + timedelta(days=1))

        def raw(s: Session) -> object:
            # The rows themselves, as stats read them before the rollups: a time window sends
            # summarize down its raw path.
            return summarize(s, config, batch_id=batches[smallest], since=window[0], until=window[1])

        page = overview_page(db, config)
        named: dict[str, Callable[[Session], object]] = {
            **{f"stats, {n:,}-job batch": stats_of(n) for n in sizes}, "overview": overview,
            "overview page": lambda _s: page(),
            f"stats, {smallest:,}-job batch, raw rows": raw}
        times: dict[str, list[float]] = {k: [] for k in named}
        rng = random.Random(1)
        with sessions() as s:
            for fn in named.values():
                fn(s)
                s.rollback()
            for r in range(runs):
                order = list(named.items())
                rng.shuffle(order)
                for key, fn in order:
                    if key.endswith("raw rows") and r % 4 and runs >= 8:
                        continue  # the slow reference: a quarter of the rounds (every one of a few)
                    t = time.perf_counter()
                    fn(s)
                    times[key].append((time.perf_counter() - t) * 1000)
                    s.rollback()
        engine.dispose()
    p95: dict[str, float] = {}
    for key, ms in times.items():
        p50, p95[key] = _p50_p95(ms)
        console.print(f"  {key}: p50 {p50:.1f} ms, p95 {p95[key]:.1f} ms ({len(ms)} runs)")
    base = p95[f"stats, {smallest:,}-job batch"]
    for n in sizes:
        key = f"stats, {n:,}-job batch"
        figures.append(Figure(NAME, f"{key}: p95 (p50 {statistics.median(times[key]):.1f} ms)", p95[key], "ms",
                              target=20, target_kind="<", extra={"jobs": n, "runs": len(times[key])}))
    largest = max(sizes)
    figures.append(Figure(NAME, f"stats p95, {largest:,} against {smallest:,} jobs",
                          p95[f"stats, {largest:,}-job batch"], "ms", baseline=base,
                          baseline_name=f"{smallest:,}-job batch", target=2,
                          target_kind="ratio<="))
    raw_key = f"stats, {smallest:,}-job batch, raw rows"
    figures.append(Figure(NAME, f"stats, {smallest:,}-job batch: p95 from the rollups vs the raw rows", base, "ms",
                          baseline=p95[raw_key], baseline_name="the raw rows (before rollups)"))
    figures.append(Figure(NAME, f"overview (per minute, 3 h; cost today), {sum(sizes):,}-job history: p95",
                          p95["overview"], "ms", target=50, target_kind="<",
                          extra={"runs": len(times["overview"])}))
    figures.append(Figure(NAME, f"overview page /ui/, server time, {sum(sizes):,}-job history: p95 (p50 "
                                f"{statistics.median(times['overview page']):.1f} ms)",
                          p95["overview page"], "ms", target=50, target_kind="<",
                          extra={"runs": len(times["overview page"])}))
    figures.append(Figure(NAME, f"rebuild-rollups, {sum(sizes):,} jobs", rebuild_s, "s",
                          extra={"jobs": built.jobs, "calls": built.calls}))
    return figures
