"""Building the pieces from ``Settings``: the entry points' one place for it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipeline.claude.client import AttemptObserver, ClaudeClient, ModelClient, RateLimiter, check_endpoint
from pipeline.claude.ratelimit import OutputReserve
from pipeline.db import make_engine, session_factory
from pipeline.errors import ConfigError
from pipeline.flow.stages import Pipeline
from pipeline.flow.warmup import WarmupGate
from pipeline.settings import Settings


def build_limiter(settings: Settings, *, on_wait: Callable[[str, float], None] | None = None) -> RateLimiter | None:
    """The tiers' shared budgets, in the broker's Redis. None for the in-process broker of the demo:
    one process has no one to share a budget with, and the API's 429s are still retried."""
    if not settings.uses_redis:
        return None
    from pipeline.claude.ratelimit import RedisRateLimiter

    return RedisRateLimiter.from_url(settings.broker_url, settings.tier_limits(), window_s=settings.rate_window_s,
                                     max_wait_s=settings.rate_max_wait_s, on_wait=on_wait)


def check_claude(settings: Settings, *, tiers: Iterable[str] | None = None) -> None:
    """Check once, at start, that the Claude endpoint answers, takes the key and knows the model of
    each of ``tiers`` (default: every tier configured); ConfigError with one sentence if not."""
    if not settings.api_key:
        raise ConfigError("ANTHROPIC_API_KEY is not set (for the fake Claude, any value will do)")
    models = settings.models
    names = list(tiers) if tiers is not None else list(models.tiers)
    check_endpoint(api_key=settings.api_key, base_url=settings.anthropic_base_url,
                   models={t: models.tier(t).model for t in names},
                   config=str(settings.config_path) if settings.config_path else "the bundled defaults.toml")


def build_pipeline(settings: Settings, *, concurrency: int = 16, limiter: RateLimiter | None = None,
                   on_attempt: AttemptObserver | None = None,
                   on_wait: Callable[[str, float], None] | None = None, worker_id: str | None = None,
                   db_connections: int | None = None) -> Pipeline:
    """``worker_id``: the worker process's heartbeat identity, which its claims carry.
    ``db_connections``: the most Postgres connections to open (half pooled, half overflow); by
    default from ``concurrency``. A worker split over processes gives each its share."""
    if not settings.api_key:
        raise ConfigError("ANTHROPIC_API_KEY is not set (for the fake Claude, any value will do)")
    if limiter is None:
        limiter = build_limiter(settings, on_wait=on_wait)
    # No pre-ping: Pipeline.run retries a unit of work that fails on a dead connection (SQLAlchemy
    # then discards the pool's other stale connections), so the ping per checkout (two per stage)
    # bought nothing the retry does not already give.
    if db_connections is None:
        engine = make_engine(settings.database_url, pool_size=min(max(concurrency // 4, 4), 16), pre_ping=False)
    else:
        pooled = max(1, db_connections // 2)
        engine = make_engine(settings.database_url, pool_size=pooled, max_overflow=max(0, db_connections - pooled),
                             pre_ping=False)
    client: ModelClient = ClaudeClient(
        api_key=settings.api_key,
        base_url=settings.anthropic_base_url,
        timeout_s=settings.call_timeout_s,
        attempts=settings.call_attempts,
        max_backoff_s=settings.retry_max_backoff_s,
        limiter=limiter,
        max_connections=max(concurrency, 10),
        on_attempt=on_attempt,
        output_reserve=OutputReserve(settings.rate_output_reserve),
    )
    if settings.test_crash_on:
        from pipeline.claude.testhooks import CrashOnMarker

        client = CrashOnMarker(client, settings.test_crash_on)
    return Pipeline(sessions=session_factory(engine), client=client, models=settings.models,
                    max_deliveries=settings.max_deliveries, claim_deadline_s=settings.effective_claim_deadline_s,
                    worker_id=worker_id,
                    transient_patience_s=settings.transient_patience_s,
                    transient_wait_min_s=settings.transient_wait_min_s,
                    transient_wait_max_s=max(settings.transient_wait_min_s, settings.transient_wait_max_s),
                    warmup=WarmupGate(lease_s=settings.cache_warmup_lease_s) if settings.cache_warmup_lease_s else None)
