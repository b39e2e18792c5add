"""What every stage task shares: the process's Pipeline, and publishing after commit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from celery import Celery, Task

from pipeline.flow.stages import Handoff, Pipeline
from pipeline.metrics import BUSY, STAGE_SECONDS, STAGES
from pipeline.settings import Settings
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
                from pipeline.flow.runtime import build_pipeline

                settings: Settings = app.conf.switchyard_settings
                # The worker command installs metrics callbacks here when --metrics-port is given,
                # and the identity of its heartbeat, which the claims it takes carry.
                hooks = app.conf.get("switchyard_hooks") or {}
                _pipeline = build_pipeline(settings, concurrency=app.conf.worker_concurrency or 16,
                                           db_connections=app.conf.get("switchyard_db_connections"),
                                           worker_id=app.conf.get("switchyard_worker_id"), **hooks)
    return _pipeline


BROKER_MARKER = "switchyard:broker-alive"


def broker_watch(broker_url: str) -> Callable[[], bool] | None:
    """A check the dispatcher runs each round: has the broker lost its data since the last round?

    Redis keeps switchyard's messages in memory only; a FLUSHALL, a FLUSHDB of the broker's
    database, or a restart without persistence drops every queued message at once. A marker key
    goes down with them, so its absence tells the sweeper to republish every unclaimed stage now
    rather than after the long stage deadline. Other brokers: no check (None)."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)

    def lost() -> bool:
        try:
            # SET NX: True only when the marker was missing, i.e. at first start or after a loss.
            created = bool(client.set(BROKER_MARKER, "1", nx=True))
        except redis.RedisError as exc:
            # The broker is unreachable: nothing can be republished now anyway. Once it is back
            # without the marker, the next round sees the loss.
            log.warning("cannot check the broker for lost messages: %s", exc)
            return False
        # At first start a fresh broker looks like a lost one: the unclaimed stages are then
        # republished once, which duplicates are harmless to.
        if created:
            log.warning("the broker has lost its data (marker %r missing): republishing unclaimed stages",
                        BROKER_MARKER)
        return created

    return lost


def publisher(app: Celery) -> Callable[[Iterable[Handoff]], None]:
    def publish(handoffs: Iterable[Handoff]) -> None:
        handoffs = list(handoffs)
        if not handoffs:
            return  # most dispatcher rounds have nothing to send
        # One producer (one pooled broker connection) for the whole lot: the dispatcher publishes
        # up to a thousand jobs a round, and acquiring the producer anew for each cost more than
        # sending the message.
        with app.producer_or_acquire() as producer:
            for h in handoffs:
                # A countdown (a job handed back to wait for its tier's rate limit) is held by a
                # worker outside its pool until due: it takes no thread while it waits.
                app.send_task(TASKS[h.stage], args=[h.job_id], queue=h.queue, producer=producer,
                              countdown=h.delay_s if h.delay_s > 0 else None, priority=h.priority)

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
        queue = (self.request.delivery_info or {}).get("routing_key") or "?"
        stage = self.name.rsplit(".", 1)[-1]
        outcome = "error"
        t0 = time.perf_counter()
        BUSY.labels(queue).inc()
        _busy.add(1)
        try:
            handoff = type(self).stage(p, job_id)
            if handoff is not None and handoff.priority is None:
                # The job's next stage keeps the priority its batch's messages carry (pipeline.flow.admission).
                handoff = replace(handoff, priority=(self.request.delivery_info or {}).get("priority"))
            if handoff is None:
                outcome = "ended"
            else:
                outcome = "deferred" if handoff.delay_s > 0 else "handoff"
                publisher(self.app)([handoff])
        finally:
            _busy.add(-1)
            BUSY.labels(queue).dec()
            STAGES.labels(queue, stage, outcome).inc()
            STAGE_SECONDS.labels(queue, stage).observe(time.perf_counter() - t0)


class _Gauge:
    """Stage runs in progress in this process, for the worker's heartbeat."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


_busy = _Gauge()


def busy() -> int:
    return _busy.value
