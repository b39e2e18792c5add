"""What an operator sees of a running switchyard: queue depths in Redis, workers online (their
heartbeats), jobs in flight and recent throughput from Postgres. `switchyard status` prints it;
the workers' and dispatcher's metrics export the queue depths.

Workers are found by heartbeat keys rather than Celery's broadcast ``inspect``: a key each worker
refreshes every few seconds costs one SCAN to read, answers at once however many workers there
are, and needs no reply from a worker that is busy. A worker that dies stops refreshing its key;
three missed beats later it is gone from `status`, and the dispatcher's sweeper republishes the
stages it held (``LapsedWorkers``, pipeline.flow.dispatch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from typing import Any, Protocol

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.config import ModelConfig
from pipeline.flow.admission import BROKER_PRIORITY_STEPS as PRIORITY_STEPS
from pipeline.models import ACTIVE, Job, JobStatus, utcnow
from pipeline.queries.rollups import ended_since
from pipeline.queries.shares import TenantShare, tenant_shares

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's messages of priority p > 0 in a list of its own named
# queue + "\x06\x16" + p (a list per level: workers.config sets them); counting only the base list,
# as some queue-depth exporters do, misses them.
PRIORITY_SEP = "\x06\x16"
UNACKED_KEY = "unacked"  # kombu: messages delivered to a worker and not yet acked (ETA ones too)


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

HEARTBEAT_PREFIX = "switchyard:worker:"
HEARTBEAT_EVERY_S = 5.0
# A worker is taken for dead once this many beats in a row have not come: a margin over a beat
# delayed by a busy process or a slow Redis, so that a live worker never loses its claims.
HEARTBEAT_MISSED_BEATS = 3
# How long a worker's record outlives its last beat. The record, not its absence, is what shows
# that a worker has stopped beating: a missing one may just be a Redis that lost its data. So it
# stays long after the lapse (far longer than any sweep takes to see it), and then goes.
HEARTBEAT_KEEP_S = 3600


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
    # The last beat, on the Redis server's clock: every host judges it against that same clock.
    seen_at: float = 0.0
    metrics_port: int | None = None
    worker_id: str = ""
    every_s: float = HEARTBEAT_EVERY_S
    stopped: bool = False

    def lapsed(self, now: float) -> bool:
        """No beat for HEARTBEAT_MISSED_BEATS beats at ``now`` (the Redis server's time)."""
        return now - self.seen_at > HEARTBEAT_MISSED_BEATS * self.every_s


_INFO_FIELDS = frozenset(f.name for f in fields(WorkerInfo))


def _parse(raw: bytes | None) -> WorkerInfo | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return WorkerInfo(**{k: v for k, v in data.items() if k in _INFO_FIELDS})
    except (ValueError, TypeError, AttributeError):
        return None


def _server_time(reply: tuple[int, int]) -> float:
    seconds, micros = reply
    return seconds + micros / 1e6


def worker_identity(tier: str, host: str, pid: int) -> str:
    """Unique per process start: a worker restarted on the same host, even with the same pid (pid 1
    in a container), is a new worker, whose beats must not keep its predecessor's claims alive."""
    return f"{tier}@{host[:100]}:{pid}:{secrets.token_hex(6)}"


class Heartbeat:
    """A worker's presence in Redis, refreshed from a daemon thread of its own, so it keeps beating
    while the worker's threads are busy with calls; ``tick`` runs with each beat (the worker
    refreshes its queue-depth gauge there). ``worker_id`` names the process in the claims it takes."""

    def __init__(self, client: redis.Redis, *, tier: str, concurrency: int, pool: str,
                 busy: Callable[[], int] = lambda: 0, metrics_port: int | None = None,
                 tick: Callable[[], None] | None = None, every_s: float = HEARTBEAT_EVERY_S) -> None:
        host = socket.gethostname()
        self.client = client
        self.worker_id = worker_identity(tier, host, os.getpid())
        self.key = f"{HEARTBEAT_PREFIX}{self.worker_id}"
        self.info = WorkerInfo(name=f"{tier}@{host}", tier=tier, host=host, pid=os.getpid(),
                               concurrency=concurrency, pool=pool, started_at=time.time(),
                               metrics_port=metrics_port, worker_id=self.worker_id, every_s=every_s)
        self._busy = busy
        self._tick = tick
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.info.busy = self._busy()
        self.info.seen_at = _server_time(self.client.time())
        self._write()

    def _write(self) -> None:
        self.client.set(self.key, json.dumps(asdict(self.info)), ex=HEARTBEAT_KEEP_S)

    def _beat_and_tick(self) -> None:
        # Redis is down: the worker cannot work either, and the sweeper cannot judge it meanwhile.
        with contextlib.suppress(redis.RedisError):
            self.beat()
        if self._tick is not None:
            with contextlib.suppress(redis.RedisError):
                self._tick()

    def _run(self) -> None:
        # At a fixed rate, not every_s after the end of the last beat: a slow beat must not
        # stretch the gaps the sweeper measures.
        due = time.monotonic() + self.every_s
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            self._beat_and_tick()
            due = max(due + self.every_s, time.monotonic())

    def start(self) -> Heartbeat:
        # The first beat before any claim: a claim never names a worker that has no record yet.
        self._beat_and_tick()
        self._thread = threading.Thread(target=self._run, name="switchyard-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """A clean stop: the worker leaves `status` at once. Its record stays, with its last beat,
        so any claim it still holds (a stage handed back at shutdown) is republished once the
        heartbeat has lapsed, as after a crash, rather than after the claim deadline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.every_s)
        self.info.stopped = True
        with contextlib.suppress(redis.RedisError):
            self._write()


def workers_online(client: redis.Redis) -> list[WorkerInfo]:
    keys = list(client.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=500))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.mget(keys)
    reply, raws = pipe.execute()
    now = _server_time(reply)
    out = [info for raw in raws if (info := _parse(raw)) is not None and not info.stopped and not info.lapsed(now)]
    return sorted(out, key=lambda w: (w.tier, w.host, w.pid))


class LapsedWorkers:
    """The sweeper's question to the heartbeats: which of these workers (as claims name them) have
    stopped beating? Only a worker whose record shows its last beat HEARTBEAT_MISSED_BEATS beats
    ago. No record (a worker that never registered in this Redis, or a Redis that lost its data)
    and an unreachable Redis judge no one: the claim deadline then decides, as the fallback."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._unreadable = False

    def __call__(self, worker_ids: Sequence[str]) -> set[str]:
        ids = list(worker_ids)
        if not ids:
            return set()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            pipe.mget([f"{HEARTBEAT_PREFIX}{w}" for w in ids])
            reply, raws = pipe.execute()
        except redis.RedisError as exc:
            if not self._unreadable:  # once per outage, not every sweep
                log.warning("cannot read the workers' heartbeats (%s): dead workers' jobs wait for the claim "
                            "deadline until Redis answers", exc)
            self._unreadable = True
            return set()
        if self._unreadable:
            log.warning("the workers' heartbeats can be read again")
            self._unreadable = False
        now = _server_time(reply)
        return {w for w, raw in zip(ids, raws, strict=True) if (info := _parse(raw)) is not None and info.lapsed(now)}


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
    # Jobs of this queue's stage waiting out transient errors in Postgres (pipeline.flow.dispatch.refeed
    # publishes them when their wait is over): part of in_flight, in no queue.
    retrying: int = 0


@dataclass
class Status:
    queues: list[QueueStatus]
    workers: list[WorkerInfo]
    in_flight: dict[str, dict[str, int]]  # status -> tier (or "-") -> jobs
    queued: int
    finished_1m: dict[str, int]
    finished_5m: dict[str, int]
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each tenant's share of the jobs in flight and its batches waiting (pipeline.queries.shares).
    tenants: list[TenantShare] = field(default_factory=list)
    # Economy mode's message batches not yet ended, per model (pipeline.flow.economy.open_batches).
    message_batches: list[dict[str, Any]] = field(default_factory=list)
    # Budgets over every batch and tenant (pipeline.flow.budgets.overview): reserved, paused jobs.
    budgets: dict[str, Any] = field(default_factory=dict)

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
    # From the rollups and the jobs not folded yet (rollups.ended_since), by whole minutes.
    finished = [ended_since(session, now - timedelta(minutes=minutes)) for minutes in (1, 5)]
    return in_flight, queued, finished[0], finished[1]


def retry_waits(session: Session) -> dict[str, dict[str, int]]:
    """Jobs whose stage waits out transient errors, by status and tier (the partial index on
    not_before holds exactly them)."""
    out: dict[str, dict[str, int]] = {}
    for status, tier, n in session.execute(
            select(Job.status, Job.tier, func.count()).where(Job.not_before.is_not(None), Job.parked.is_(False),
                                                             Job.status.in_(ACTIVE))
            .group_by(Job.status, Job.tier)):
        out.setdefault(JobStatus(status).value, {})[tier or "-"] = n
    return out


def queue_in_flight(queue: str, in_flight: dict[str, dict[str, int]]) -> int:
    """Jobs whose current stage is served by ``queue``."""
    if queue == "triage":
        return sum(in_flight.get("triaging", {}).values())
    if queue == "validate":
        return sum(in_flight.get("validating", {}).values())
    return in_flight.get("working", {}).get(queue, 0)


class RateLevels(Protocol):
    def levels(self, tier: str) -> dict[str, Any]: ...


def gather(client: redis.Redis, session: Session, models: ModelConfig, limiter: RateLevels) -> Status:
    """The whole picture. ``limiter`` reads each tier's limits and 429 pause (the tiers' shared
    budgets, pipeline.claude.ratelimit); each queue shows the pause of the tier its stage calls."""
    queues = models.queues
    depths = queue_depths(client, queues)
    reserved = reserved_by_queue(client)
    workers = workers_online(client)
    in_flight, queued, f1, f5 = job_counts(session)
    waits = retry_waits(session)
    tier_limits = {tier: limiter.levels(tier) for tier in models.tiers}
    rows = []
    for q in queues:
        mine = [w for w in workers if w.tier == q]
        rows.append(QueueStatus(
            queue=q, depth=depths[q], reserved=reserved.get(q, 0), in_flight=queue_in_flight(q, in_flight),
            workers=len(mine), concurrency=sum(w.concurrency for w in mine), busy=sum(w.busy for w in mine),
            paused_s=float(tier_limits[models.queue_tier(q)]["paused_s"]),
            retrying=queue_in_flight(q, waits),
        ))
    from pipeline.flow.budgets import overview
    from pipeline.flow.economy import open_batches

    return Status(queues=rows, workers=workers, in_flight=in_flight, queued=queued, finished_1m=f1,
                  finished_5m=f5, limits=tier_limits, tenants=tenant_shares(session),
                  message_batches=open_batches(session.connection()), budgets=asdict(overview(session)))
