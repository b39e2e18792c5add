"""`switchyard status`: reading the picture (pipeline.ops) from Settings, and drawing it."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table

from pipeline.errors import ConfigError
from pipeline.ops import Status, gather
from pipeline.settings import Settings


class StatusSource:
    def __init__(self, settings: Settings) -> None:
        if not settings.uses_redis:
            raise ConfigError(f"switchyard status reads the queues in Redis, but BROKER_URL is "
                              f"{settings.broker_url!r}: point it at the workers' Redis")
        import redis

        from pipeline.db import make_engine, session_factory
        from pipeline.ratelimit import RedisRateLimiter
        from workers.config import queue_names

        self.settings = settings
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        self.sessions = session_factory(make_engine(settings.database_url))
        self.limiter = RedisRateLimiter(self.redis, settings.tier_limits(), window_s=settings.rate_window_s)
        self.queues = queue_names(settings)
        models = settings.models
        self.tier_of = {"triage": models.triage_tier, "validate": models.format_check_tier}

    def limits(self) -> dict[str, dict[str, Any]]:
        return {tier: self.limiter.levels(tier) for tier in self.settings.models.tiers}

    def snapshot(self) -> Status:
        import redis

        try:
            with self.sessions() as session:
                return gather(self.redis, session, self.queues, tier_of=self.tier_of, limits=self.limits)
        except redis.RedisError as exc:
            raise ConfigError(f"cannot reach Redis at BROKER_URL: {exc}") from None


def _limit(n: int) -> str:
    return f"{n:,}" if n else "-"


def render_status(st: Status) -> Group:
    queues = Table(title="Queues", title_justify="left")
    for col in ("queue", "waiting", "held by workers", "jobs in stage", "retrying later", "workers", "threads",
                "busy", "paused"):
        queues.add_column(col, justify="left" if col == "queue" else "right")
    for q in st.queues:
        queues.add_row(q.queue, f"{q.depth:,}", f"{q.reserved:,}", f"{q.in_flight:,}", f"{q.retrying:,}",
                       str(q.workers), str(q.concurrency), str(q.busy), f"{q.paused_s:.1f} s" if q.paused_s else "")

    workers = Table(title="Workers online", title_justify="left")
    for col in ("worker", "pid", "pool", "threads", "busy", "up", "metrics"):
        workers.add_column(col, justify="left" if col in ("worker", "pool") else "right")
    now = time.time()
    for w in st.workers:
        workers.add_row(w.name, str(w.pid), w.pool, str(w.concurrency), str(w.busy),
                        f"{now - w.started_at:.0f} s", f":{w.metrics_port}" if w.metrics_port else "")

    limits = Table(title="Rate limits per tier (per minute; - is none)", title_justify="left")
    for col in ("tier", "requests", "input tokens", "output tokens", "paused"):
        limits.add_column(col, justify="left" if col == "tier" else "right")
    for tier, lim in st.limits.items():
        limits.add_row(tier, _limit(lim["rpm"]), _limit(lim["itpm"]), _limit(lim["otpm"]),
                       f"{lim['paused_s']:.1f} s" if lim["paused_s"] else "")

    def fmt(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items())) or "none"

    summary = Table.grid(padding=(0, 2))
    summary.add_row("waiting in Postgres", f"{st.queued:,} job(s)")
    summary.add_row("finished, last minute", fmt(st.finished_1m))
    summary.add_row("finished, last 5 minutes", fmt(st.finished_5m))
    return Group(queues, workers, limits, summary)
