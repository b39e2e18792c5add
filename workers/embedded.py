"""Workers inside the current process, on threads: for `switchyard demo` (with the in-process
broker) and for tests that need a worker but not a separate process."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from celery import Celery
from celery.worker import state


@contextmanager
def embedded_worker(app: Celery, *, queues: Sequence[str], concurrency: int = 8, pool: str = "threads",
                    loglevel: str = "WARNING") -> Iterator[None]:
    import workers.shadow
    import workers.triage
    import workers.validate
    import workers.work  # noqa: F401

    worker = app.WorkController(
        app=app, concurrency=concurrency, pool=pool, queues=list(queues), loglevel=loglevel,
        hostname=f"embedded-{threading.get_ident()}@localhost",
        without_heartbeat=True, without_mingle=True, without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="switchyard-embedded-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        # The same stop signal Celery's own test worker uses: finish what runs, then return.
        state.should_terminate = 0
        thread.join(30)
        state.should_terminate = None
