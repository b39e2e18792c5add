"""What every stage task shares: the process's Pipeline, and publishing after commit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from celery import Celery, Task

from pipeline.settings import Settings
from pipeline.stages import Handoff, Pipeline
from workers.config import TASKS

log = logging.getLogger("switchyard.worker")

_lock = threading.Lock()
_pipeline: Pipeline | None = None


def install_pipeline(p: Pipeline | None) -> None:
    """Give this process its Pipeline (the embedded demo and the worker boot call this)."""
    global _pipeline
    with _lock:
        _pipeline = p


def current_pipeline(app: Celery) -> Pipeline:
    global _pipeline
    if _pipeline is None:
        with _lock:
            if _pipeline is None:
                from pipeline.runtime import build_pipeline

                settings: Settings = app.conf.switchyard_settings
                _pipeline = build_pipeline(settings, concurrency=app.conf.worker_concurrency or 16)
    return _pipeline


def publisher(app: Celery) -> Callable[[Iterable[Handoff]], None]:
    def publish(handoffs: Iterable[Handoff]) -> None:
        for h in handoffs:
            app.send_task(TASKS[h.stage], args=[h.job_id], queue=h.queue)

    return publish


class StageTask(Task):  # type: ignore[misc]
    """Runs one domain stage on a job id and publishes the hand-off the stage returns.

    The stage commits before it returns, so the next stage's message can never arrive before the
    state it needs. No retries here: model calls retry inside the Claude client, database
    disconnects inside Pipeline.run, and a lost message is the sweeper's to republish."""

    abstract = True
    stage: Callable[[Pipeline, int], Handoff | None]

    def run_stage(self, job_id: int) -> None:
        p = current_pipeline(self.app)
        handoff = type(self).stage(p, job_id)
        if handoff is not None:
            publisher(self.app)([handoff])
