"""What an operator sees of a running switchyard: queue depths in Redis, workers online (their
heartbeats), jobs in flight and recent throughput from Postgres. `switchyard status` prints it;
the workers' and dispatcher's metrics export the queue depths.

Workers are found by heartbeat keys rather than Celery's broadcast ``inspect``: a key each worker
refreshes every few seconds costs one SCAN to read, answers at once however many workers there
are, needs no reply from a worker that is busy, and expires by itself when a worker dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import ACTIVE, TERMINAL, Job, JobStatus, utcnow

# kombu's Redis transport keeps a queue's messages of priority p > 0 in a list of its own named
# queue + "\x06\x16" + p; counting only the base list, as some queue-depth exporters do, misses them.
PRIORITY_SEP = "\x06\x16"
UNACKED_KEY = "unacked"  # kombu: messages delivered to a worker and not yet acked (ETA ones too)
HEARTBEAT_PREFIX = "switchyard:worker:"
HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_TTL_S = 3 * HEARTBEAT_EVERY_S


def queue_lists(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue, every priority list included."""
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for q in names:
        for key in queue_lists(q):
            pipe.llen(key)
    counts = pipe.execute()
    steps = len(PRIORITY_STEPS)
    return {q: sum(counts[i * steps:(i + 1) * steps]) for i, q in enumerate(names)}


def reserved_by_queue(client: redis.Redis) -> dict[str, int]:
    """Messages workers hold unacked (running, or waiting out a countdown), by queue. Bounded by
    the dispatcher's max_in_flight, so reading them all is cheap."""
    out: dict[str, int] = {}
    for raw in client.hvals(UNACKED_KEY):
        try:
            queue = str(json.loads(raw)[2])
        except (ValueError, IndexError, TypeError):
            continue
        out[queue] = out.get(queue, 0) + 1
    return out


# -- heartbeats --------------------------------------------------------------------------------------


@dataclass
class WorkerInfo:
    name: str
    tier: str
    host: str
    pid: int
    concurrency: int
    pool: str
    busy: int = 0
    started_at: float = 0.0
    seen_at: float = 0.0
    metrics_port: int | None = None


class Heartbeat:
    """A worker's presence in Redis, refreshed from a daemon thread; ``tick`` runs with each beat
    (the worker refreshes its queue-depth gauge there)."""

    def __init__(self, client: redis.Redis, *, tier: str, concurrency: int, pool: str,
                 busy: Callable[[], int] = lambda: 0, metrics_port: int | None = None,
                 tick: Callable[[], None] | None = None, every_s: float = HEARTBEAT_EVERY_S) -> None:
        host = socket.gethostname()
        self.client = client
        self.key = f"{HEARTBEAT_PREFIX}{tier}@{host}:{os.getpid()}"
        self.info = WorkerInfo(name=f"{tier}@{host}", tier=tier, host=host, pid=os.getpid(),
                               concurrency=concurrency, pool=pool, started_at=time.time(),
                               metrics_port=metrics_port)
        self._busy = busy
        self._tick = tick
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.info.busy = self._busy()
        self.info.seen_at = time.time()
        self.client.set(self.key, json.dumps(asdict(self.info)), ex=int(max(HEARTBEAT_TTL_S, 3 * self.every_s)))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                if self._tick is not None:
                    self._tick()
            except redis.RedisError:
                pass  # Redis is down: the worker cannot work either, and its key will expire
            self._stop.wait(self.every_s)

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="switchyard-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.key)


def workers_online(client: redis.Redis) -> list[WorkerInfo]:
    keys = list(client.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=500))
    out = []
    for raw in client.mget(keys) if keys else []:
        if raw is not None:
            out.append(WorkerInfo(**json.loads(raw)))
    return sorted(out, key=lambda w: (w.tier, w.host, w.pid))


# -- the whole picture ---------------------------------------------------------------------------------


@dataclass
class QueueStatus:
    queue: str
    depth: int
    reserved: int
    in_flight: int
    workers: int
    concurrency: int
    busy: int
    paused_s: float = 0.0


@dataclass
class Status:
    queues: list[QueueStatus]
    workers: list[WorkerInfo]
    in_flight: dict[str, dict[str, int]]  # status -> tier (or "-") -> jobs
    queued: int
    finished_1m: dict[str, int]
    finished_5m: dict[str, int]
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_counts(session: Session) -> tuple[dict[str, dict[str, int]], int, dict[str, int], dict[str, int]]:
    """Jobs in flight by status and tier, jobs waiting, and jobs finished in the last 1 and 5 min."""
    in_flight: dict[str, dict[str, int]] = {}
    for status, tier, n in session.execute(
            select(Job.status, Job.tier, func.count()).where(Job.status.in_(ACTIVE)).group_by(Job.status, Job.tier)):
        in_flight.setdefault(JobStatus(status).value, {})[tier or "-"] = n
    queued = session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)) or 0
    now = utcnow()
    finished: list[dict[str, int]] = []
    for minutes in (1, 5):
        rows = session.execute(
            select(Job.status, func.count())
            .where(Job.status.in_(TERMINAL), Job.finished_at >= now - timedelta(minutes=minutes))
            .group_by(Job.status))
        finished.append({JobStatus(s).value: n for s, n in rows})
    return in_flight, queued, finished[0], finished[1]


def queue_in_flight(queue: str, in_flight: dict[str, dict[str, int]]) -> int:
    """Jobs whose current stage is served by ``queue``."""
    if queue == "triage":
        return sum(in_flight.get("triaging", {}).values())
    if queue == "validate":
        return sum(in_flight.get("validating", {}).values())
    return in_flight.get("working", {}).get(queue, 0)


def gather(client: redis.Redis, session: Session, queues: list[str], *, tier_of: dict[str, str] | None = None,
           limits: Callable[[], dict[str, dict[str, Any]]] | None = None) -> Status:
    """``tier_of`` maps a queue to the model tier whose budget it spends (triage -> haiku)."""
    depths = queue_depths(client, queues)
    reserved = reserved_by_queue(client)
    workers = workers_online(client)
    in_flight, queued, f1, f5 = job_counts(session)
    tier_limits = limits() if limits else {}
    rows = []
    for q in queues:
        mine = [w for w in workers if w.tier == q]
        rows.append(QueueStatus(
            queue=q, depth=depths[q], reserved=reserved.get(q, 0), in_flight=queue_in_flight(q, in_flight),
            workers=len(mine), concurrency=sum(w.concurrency for w in mine), busy=sum(w.busy for w in mine),
            paused_s=float(tier_limits.get((tier_of or {}).get(q, q), {}).get("paused_s", 0.0)),
        ))
    return Status(queues=rows, workers=workers, in_flight=in_flight, queued=queued, finished_1m=f1,
                  finished_5m=f5, limits=tier_limits)
