"""Building the pieces from ``Settings``: the entry points' one place for it."""

from __future__ import annotations

from pipeline.claude import ClaudeClient, RateLimiter
from pipeline.db import make_engine, session_factory
from pipeline.errors import ConfigError
from pipeline.settings import Settings
from pipeline.stages import Pipeline


def build_pipeline(settings: Settings, *, concurrency: int = 16, limiter: RateLimiter | None = None) -> Pipeline:
    if not settings.api_key:
        raise ConfigError("ANTHROPIC_API_KEY is not set (for the fake Claude, any value will do)")
    engine = make_engine(settings.database_url, pool_size=min(max(concurrency // 4, 4), 16))
    client = ClaudeClient(
        api_key=settings.api_key,
        base_url=settings.anthropic_base_url,
        timeout_s=settings.call_timeout_s,
        attempts=settings.call_attempts,
        max_backoff_s=settings.retry_max_backoff_s,
        limiter=limiter,
        max_connections=max(concurrency, 10),
    )
    return Pipeline(sessions=session_factory(engine), client=client, models=settings.models,
                    max_deliveries=settings.max_deliveries)
