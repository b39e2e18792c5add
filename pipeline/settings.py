"""The one place that reads the environment. Only entry points (CLI, worker boot, the API) build a
``Settings``; everything below them takes plain arguments."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.claude.ratelimit import TierLimits, parse_overrides
from pipeline.config import ModelConfig, load_config
from pipeline.errors import ConfigError
from pipeline.flow.warmup import DEFAULT_LEASE_S

DEFAULT_SQLITE_URL = "sqlite:///.switchyard/switchyard.sqlite"

# A URL's password: after "scheme://user:", up to the last "@" of the word (a password people forgot
# to percent-encode may hold "@", ":" or "/"), or a libpq-style "password=" parameter.
_PASSWORD_IN_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)\S*@")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#\s'\"]*", re.IGNORECASE)


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it masked: a URL alone, or a message quoting
    one. Everything switchyard prints or logs that may hold DATABASE_URL, BROKER_URL or
    ANTHROPIC_BASE_URL goes through here."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", text))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    def __init__(self, **values: Any) -> None:
        # pydantic's report is a dozen lines of its own internals; an operator needs the variable,
        # its value and what is wrong with it.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = ".".join(str(part) for part in first["loc"]) or "the environment"
            raise ConfigError(f"{name}={first['input']!r}: {first['msg']}") from None

    database_url: str = Field(DEFAULT_SQLITE_URL, alias="DATABASE_URL")
    broker_url: str = Field("memory://", alias="BROKER_URL")
    anthropic_api_key: str | None = Field(None, alias="ANTHROPIC_API_KEY", repr=False)
    anthropic_base_url: str | None = Field(None, alias="ANTHROPIC_BASE_URL")
    config_path: Path | None = Field(None, alias="SWITCHYARD_CONFIG")

    # A hard timeout on each HTTP call. The threads pool cannot enforce Celery's time_limit
    # (celery#9203), so this is what bounds a stuck call.
    call_timeout_s: float = Field(120.0, alias="SWITCHYARD_CALL_TIMEOUT_S")
    # Attempts per model call for transient errors (429, 5xx, timeouts). The SDK's own retries
    # are switched off so that these do not multiply with it.
    call_attempts: int = Field(4, alias="SWITCHYARD_CALL_ATTEMPTS")
    retry_max_backoff_s: float = Field(30.0, alias="SWITCHYARD_RETRY_MAX_BACKOFF_S")
    # When a call's attempts all meet transient errors, its stage goes back to its queue and tries
    # again later (pipeline.flow.stages): real overloads come in bursts that last minutes. The job fails
    # only once its stage has met nothing but transient errors for this long.
    transient_patience_s: float = Field(3600.0, alias="SWITCHYARD_TRANSIENT_PATIENCE_S", ge=0)
    # The wait before such a stage tries again: as long as it has already waited, within these.
    transient_wait_min_s: float = Field(10.0, alias="SWITCHYARD_TRANSIENT_WAIT_MIN_S", ge=0)
    transient_wait_max_s: float = Field(300.0, alias="SWITCHYARD_TRANSIENT_WAIT_MAX_S", ge=0)

    # The dispatcher keeps at most this many jobs in the stages at once; the rest wait in
    # Postgres, so Redis never holds a whole batch.
    max_in_flight: int = Field(2000, alias="SWITCHYARD_MAX_IN_FLIGHT")
    # Postgres connections a worker may open, all its processes together, when `switchyard worker`
    # is not given --db-connections (default: C/2, between 8 and 32). Each worker on a host counts
    # against the server's max_connections (100 by default), so a host of many workers sets it lower.
    worker_db_connections: int | None = Field(None, alias="SWITCHYARD_DB_CONNECTIONS", ge=1)
    dispatch_interval_s: float = Field(0.5, alias="SWITCHYARD_DISPATCH_INTERVAL_S", gt=0, le=3600, allow_inf_nan=False)
    # How often the dispatcher folds ended jobs and finished calls into the rollups that `stats`,
    # `batches` and the dashboard read (pipeline.queries.rollups); what is newer is read raw.
    rollup_interval_s: float = Field(5.0, alias="SWITCHYARD_ROLLUP_INTERVAL_S", gt=0, le=3600, allow_inf_nan=False)
    # A stage that has made no progress for this long is republished by the sweeper. It must be
    # longer than the slowest stage can legitimately take, retries included.
    stage_deadline_s: float | None = Field(None, alias="SWITCHYARD_STAGE_DEADLINE_S")
    # A stage a worker has begun, with no sign of life (a new call attempt) for this long, is taken
    # to have lost its worker and is republished. It must exceed one call attempt plus its backoff.
    # A killed worker's stages come back sooner, once its heartbeat lapses (pipeline.queries.ops); this is
    # the fallback when the heartbeat cannot be read.
    claim_deadline_s: float | None = Field(None, alias="SWITCHYARD_CLAIM_DEADLINE_S")
    # A job whose stage was started this many times without finishing is a poison job.
    max_deliveries: int = Field(3, alias="SWITCHYARD_MAX_DELIVERIES")
    # TEST HOOK, off by default: a worker whose call prompt contains this marker kills its own
    # process, as the kernel's OOM killer would. It exists for the poison-job fault test
    # (tests/faults) and does nothing unless set; see pipeline/claude/testhooks.py.
    test_crash_on: str | None = Field(None, alias="SWITCHYARD_TEST_CRASH_ON")
    # TEST HOOK, off by default: "after_create=MARKER" or "while_polling=MARKER" makes the dispatcher
    # SIGKILL itself once at that point of economy mode (pipeline.flow.economy), for the fault tests.
    test_economy_kill: str | None = Field(None, alias="SWITCHYARD_TEST_ECONOMY_KILL")

    # The HTTP API (`switchyard serve`). A request body past this many bytes is refused with 413
    # while it streams in; a batch of more jobs than this is refused with 413 before any is written.
    api_max_body_bytes: int = Field(64 * 1024 * 1024, alias="SWITCHYARD_API_MAX_BODY_BYTES")
    api_max_batch_jobs: int = Field(100_000, alias="SWITCHYARD_API_MAX_BATCH_JOBS")
    # The dashboard's session cookies are signed with it: set it (any long random string) so sessions
    # survive a restart and hold across `serve --workers N`; unset, each process draws a random one.
    ui_secret: str | None = Field(None, alias="SWITCHYARD_UI_SECRET", repr=False)
    ui_session_s: int = Field(8 * 3600, alias="SWITCHYARD_UI_SESSION_S", gt=0)
    # Mark the cookies Secure (sent over HTTPS only): set it when a TLS proxy fronts `switchyard serve`.
    ui_secure_cookies: bool = Field(False, alias="SWITCHYARD_UI_SECURE_COOKIES")
    # Rate limits per tier, over those of the model configuration: "sonnet.rpm=50,opus.otpm=8000".
    rate_limits: str | None = Field(None, alias="SWITCHYARD_RATE_LIMITS")
    # The limits are per this many seconds. Anthropic's are per minute; tests shorten it.
    rate_window_s: float = Field(60.0, alias="SWITCHYARD_RATE_WINDOW_S", gt=0)
    # A call that would wait longer than this for its tier's budget hands its job back to the queue
    # with a countdown instead of holding a worker thread (pipeline.claude.ratelimit).
    rate_max_wait_s: float = Field(10.0, alias="SWITCHYARD_RATE_MAX_WAIT_S", ge=0)
    # What a call reserves of its tier's output-token budget: "max_tokens" (the worst case, as the
    # API estimates OTPM) or "observed" (the largest recent answer; pipeline.claude.ratelimit.OutputReserve).
    rate_output_reserve: str = Field("max_tokens", alias="SWITCHYARD_RATE_OUTPUT_RESERVE")
    # One call warms a cached prompt prefix while the others that need it wait (pipeline.flow.warmup),
    # for at most this long if it dies or is slow; 0 turns the warm-up off (every call goes at once).
    cache_warmup_lease_s: float = Field(DEFAULT_LEASE_S, alias="SWITCHYARD_CACHE_WARMUP_LEASE_S", ge=0,
                                        allow_inf_nan=False)
    # Serve Prometheus metrics on this port (workers and the dispatcher); unset: no metrics server.
    metrics_port: int | None = Field(None, alias="SWITCHYARD_METRICS_PORT", ge=1, le=65535)
    # Workers send Celery's task events (received, started, succeeded...), which Flower and
    # `celery events` show per task. Off by default: each task state is a publish to the broker.
    task_events: bool = Field(False, alias="SWITCHYARD_TASK_EVENTS")

    @field_validator("config_path", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # docker-compose passes SWITCHYARD_CONFIG through as "" when the operator has not set it:
        # the bundled defaults then, not the working directory read as a file.
        return None if isinstance(value, str) and not value.strip() else value

    @cached_property
    def models(self) -> ModelConfig:
        return load_config(self.config_path)

    def tier_limits(self) -> dict[str, TierLimits]:
        base = {name: TierLimits(t.rpm, t.itpm, t.otpm) for name, t in self.models.tiers.items()}
        return parse_overrides(self.rate_limits, base)

    @property
    def uses_redis(self) -> bool:
        return self.broker_url.startswith(("redis://", "rediss://", "unix://"))

    def connects_to(self, *, claude: bool = False) -> str:
        """Where a process connects, for its start-up line, every password masked."""
        where = f"database {mask_url(self.database_url)}, broker {mask_url(self.broker_url)}"
        if claude:
            where += f", Claude API at {mask_url(self.anthropic_base_url or 'https://api.anthropic.com')}"
        return where

    @property
    def api_key(self) -> str | None:
        return self.anthropic_api_key

    @property
    def effective_stage_deadline_s(self) -> float:
        if self.stage_deadline_s is not None:
            return self.stage_deadline_s
        return self.call_timeout_s * self.call_attempts + self.retry_max_backoff_s * self.call_attempts + 60

    @property
    def effective_claim_deadline_s(self) -> float:
        if self.claim_deadline_s is not None:
            return self.claim_deadline_s
        # One attempt, then the longest wait before the next (a retry-after is honoured up to 60 s).
        return self.call_timeout_s + max(self.retry_max_backoff_s, 60.0) + 30
