"""`switchyard status`: reading the picture (pipeline.queries.ops) from Settings, and drawing it."""

from __future__ import annotations

import time
from collections import Counter

from rich.console import Group
from rich.table import Table
from rich.text import Text

from pipeline.cli.tables import compact, new_table
from pipeline.errors import BrokerDown, ConfigError
from pipeline.queries.ops import Status, gather
from pipeline.settings import Settings, mask_url


class StatusSource:
    def __init__(self, settings: Settings) -> None:
        if not settings.uses_redis:
            raise ConfigError(f"switchyard status reads the queues in Redis, but BROKER_URL is "
                              f"{mask_url(settings.broker_url)!r}: point it at the workers' Redis")
        import redis

        from pipeline.claude.ratelimit import RedisRateLimiter
        from pipeline.db import make_engine, session_factory

        self.settings = settings
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        self.sessions = session_factory(make_engine(settings.database_url))
        self.limiter = RedisRateLimiter(self.redis, settings.tier_limits(), window_s=settings.rate_window_s)

    def snapshot(self) -> Status:
        import redis

        try:
            with self.sessions() as session:
                return gather(self.redis, session, self.settings.models, self.limiter)
        except redis.RedisError as exc:
            raise BrokerDown(f"cannot reach Redis at BROKER_URL: {exc}") from None


def _limit(n: int) -> str:
    return compact(n) if n else "-"


def _paused(seconds: float) -> str:
    return compact(seconds, "s") if seconds else ""


def render_status(st: Status) -> Group:
    figures = ("waiting", "held", "in stage", "retrying", "workers", "threads", "busy", "paused")
    queues = new_table(("queue", *figures), figures=figures,
                       title="Queues (held: taken by a worker, not yet acknowledged; retrying: waiting out "
                             "transient errors)")
    for q in st.queues:
        queues.add_row(q.queue, *map(compact, (q.depth, q.reserved, q.in_flight, q.retrying, q.workers, q.concurrency,
                                              q.busy)), _paused(q.paused_s))

    workers = new_table(("worker", "pid", "pool", "threads", "busy", "up", "metrics"),
                        figures=("pid", "threads", "busy", "up", "metrics"), title="Workers online")
    now = time.time()
    for w in st.workers:
        workers.add_row(w.name, str(w.pid), w.pool, compact(w.concurrency), compact(w.busy),
                        compact(now - w.started_at, "s"), f":{w.metrics_port}" if w.metrics_port else "")

    per_minute = ("requests", "input tokens", "output tokens", "paused")
    limits = new_table(("tier", *per_minute), figures=per_minute, title="Rate limits per tier (per minute; - is none)")
    for tier, lim in st.limits.items():
        limits.add_row(tier, _limit(lim["rpm"]), _limit(lim["itpm"]), _limit(lim["otpm"]), _paused(lim["paused_s"]))

    def fmt(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {compact(v)}" for k, v in sorted(d.items())) or "none"

    share = ("weight", "in flight", "share", "batches waiting")
    tenants = new_table(("tenant", *share), figures=share[:-1],
                        title="Tenants (the dispatcher's round robin: share of the jobs in flight; waiting: the "
                              "priority of each batch with queued jobs)")
    for t in st.tenants:
        by_priority = Counter(t.waiting)
        tenants.add_row(Text(t.tenant), f"{t.weight:g}", compact(t.in_flight), f"{100 * t.share:.0f}%",
                        ", ".join(f"p{p}" + (f" ×{n}" if n > 1 else "") for p, n in by_priority.items()) or "-")
    parts: list[Table] = [queues, workers, limits, *((tenants,) if st.tenants else ())]
    if st.message_batches:
        counted = ("requests", "age", "processing", "succeeded", "errored", "expired", "canceled")
        batches = new_table(("model", "message batch", "state", *counted), figures=counted,
                            whole=("message batch",), title="Economy mode: open message batches, and the requests "
                                                             "waiting for the next one")
        for m in st.message_batches:
            for b in m["batches"]:
                counts = b["counts"]
                batches.add_row(m["model"], b["id"] or "(being created)", b["state"], compact(b["requests"]),
                                compact(b["age_s"], "s"), *(compact(counts.get(k, 0)) for k in counted[2:]))
            if m["pending_requests"]:
                batches.add_row(m["model"], "(next batch)", "pending", compact(m["pending_requests"]), "",
                                *[""] * 5)
        parts.append(batches)

    summary = Table.grid(padding=(0, 2))
    summary.add_row("waiting in Postgres", f"{compact(st.queued)} job(s)")
    summary.add_row("finished, last minute", fmt(st.finished_1m))
    summary.add_row("finished, last 5 minutes", fmt(st.finished_5m))
    if st.budgets:
        b = st.budgets
        summary.add_row("budgets", f"{compact(b['reserved_usd'], 'usd')} reserved by {compact(b['calls_reserved'])} "
                                   f"call(s) in flight; {compact(b['paused'])} job(s) paused in "
                                   f"{compact(b['exhausted_batches'])} batch(es) out of budget")
    return Group(*parts, summary)
