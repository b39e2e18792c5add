"""The overhead baseline: a bare Celery app with switchyard's worker settings, passing each job
through three tasks on three queues, each task making one row update in Postgres.

It is what "Celery alone" costs for a three-hop pipeline: the broker round trips, the task
protocol and one committed write per hop, nothing else. Workers run it with
``celery -A bench.bare worker -Q bare1 ...``, exactly as switchyard's workers run theirs.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import Celery
from kombu import Queue
from sqlalchemy import Engine, text

from pipeline.db import make_engine
from pipeline.settings import Settings
from workers.config import make_app

QUEUES = ("bare1", "bare2", "bare3")
TABLE = "bench_bare"
# Keys that make_app sets for switchyard's own app structure, not how a worker behaves.
_NOT_SETTINGS = {"include", "task_queues", "task_default_queue", "switchyard_settings", "imports"}


def same_worker_settings(settings: Settings) -> dict[str, Any]:
    """Every setting switchyard's app changes from Celery's defaults (acks late, prefetch, pool
    behaviour, serialiser, visibility timeout...), so both sides run with the same worker settings."""
    ours, default = make_app(settings).conf, Celery().conf
    return {k: ours[k] for k in ours if k not in _NOT_SETTINGS and ours[k] != default.get(k)}


def comparison_app(name: str, queues: tuple[str, ...], settings: Settings | None = None) -> Celery:
    """A Celery app of the benchmarks' own, on ``queues``, with switchyard's worker settings."""
    settings = settings or Settings()
    app = Celery(name, broker=settings.broker_url)
    app.conf.update(same_worker_settings(settings))
    app.conf.update(task_queues=[Queue(q) for q in queues], task_default_queue=queues[0])
    return app


def make_bare_app(settings: Settings | None = None) -> Celery:
    return comparison_app("bare", QUEUES, settings)


app = make_bare_app()
app.set_default()

_lock = threading.Lock()
_engine: Engine | None = None


def engine() -> Engine:
    """One pooled engine per worker process, sized as switchyard sizes its own (runtime.build_pipeline)."""
    global _engine
    with _lock:
        if _engine is None:
            c = int(os.environ.get("BARE_CONCURRENCY", "16"))
            _engine = make_engine(Settings().database_url, pool_size=min(max(c // 4, 4), 16))
        return _engine


@app.task(name="bare.step", ignore_result=True)
def step(row_id: int, n: int) -> None:
    # One committed row update, then publish the next hop after the commit, as switchyard does.
    with engine().begin() as conn:
        conn.execute(text(f"UPDATE {TABLE} SET step = :n, updated_at = now() WHERE id = :id"),
                     {"n": n, "id": row_id})
    if n < len(QUEUES):
        app.send_task("bare.step", args=[row_id, n + 1], queue=QUEUES[n])


CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigint PRIMARY KEY,
    step int NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
