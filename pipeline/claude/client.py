"""The one place switchyard talks to Claude, through the official SDK.

Who retries: this module, not the SDK and not Celery. The SDK is built with ``max_retries=0`` and
each call here makes at most ``attempts`` HTTP requests, so retries never multiply between layers.
What is retried is what the SDK itself would retry (``translate``): 408, 409, 429 with
``retry-after``, 5xx and 529, timeouts, dropped connections; they back off with jitter and honour
``retry-after``. Everything else (any other 4xx, and a 429 without ``retry-after``, a spend limit)
fails at once with the API's own message.
Every HTTP attempt, failed or not, comes back to the caller so it can be recorded as a row.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import httpx2 as httpx
import orjson

from pipeline.claude.pricing import Usage
from pipeline.claude.ratelimit import OutputReserve
from pipeline.errors import (
    CallFailed,
    ClaudeError,
    ConfigError,
    Deferred,
    PermanentClaudeError,
    RateLimited,
    TransientClaudeError,
)

# The SDK is imported where it is used, not here: importing it costs most of a second of CPU
# (hundreds of pydantic models), which the dispatcher and the CLI, which import this module for
# its types and never call, would pay at every start. A worker imports it when it first calls.
if TYPE_CHECKING:
    import anthropic
    from anthropic.types import CacheControlEphemeralParam, OutputConfigParam, TextBlockParam

log = logging.getLogger(__name__)

# The SDK honours retry-after up to 60 s; so do we. A longer wait is better spent re-queued.
MAX_RETRY_AFTER_S = 60.0
BASE_BACKOFF_S = 0.5
# The most connections one HTTP pool holds (ClaudeClient explains why there are several).
SHARD_CONNECTIONS = 32


@dataclass
class Attempt:
    number: int
    started_at: datetime
    finished_at: datetime
    latency_ms: float
    ok: bool
    status_code: int | None = None
    request_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    text: str | None = None
    stop_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    retry_after: float | None = None
    # Economy mode (pipeline.flow.economy): the message batch that answered, and the request row
    # the answer was stored in; None for a synchronous call.
    message_batch_id: str | None = None
    economy_request_id: int | None = None


@dataclass
class CallResult:
    text: str
    stop_reason: str | None
    attempts: list[Attempt]


class RateLimiter(Protocol):
    """A budget shared by every worker of a tier (see pipeline.claude.ratelimit).

    ``acquire`` waits for a turn (or raises RateLimited before anything is sent); ``adjust``
    corrects the reservation once the usage is known; ``penalize`` pauses the tier after a 429.
    ``pauses_on_penalty`` says whether the next ``acquire`` waits out that pause itself."""

    pauses_on_penalty: bool

    def acquire(self, tier: str, *, input_tokens: int, output_tokens: int) -> float | None: ...

    def adjust(self, tier: str, *, input_tokens: int = 0, output_tokens: int = 0) -> None: ...

    def penalize(self, tier: str, *, retry_after: float) -> None: ...


class ModelClient(Protocol):
    """What the stages call: ClaudeClient, or a test hook wrapped around it (pipeline.claude.testhooks)."""

    def call(self, *, tier: str, model: str, system: str, user: str, max_tokens: int,
             on_retry: Callable[[int], None] | None = None, cache_system: bool = False,
             cache_ttl: str = "5m", output_schema: dict[str, Any] | None = None) -> CallResult: ...

    def close(self) -> None: ...


class NoLimit:
    pauses_on_penalty = False

    def acquire(self, tier: str, *, input_tokens: int, output_tokens: int) -> float | None:
        return None

    def adjust(self, tier: str, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        return None

    def penalize(self, tier: str, *, retry_after: float) -> None:
        return None


# Told about every HTTP attempt once it has ended (metrics): tier, model, the attempt.
AttemptObserver = Callable[[str, str, "Attempt"], None]


def _header(headers: Any, name: str) -> str | None:
    try:
        value = headers.get(name)
    except AttributeError:
        return None
    return str(value) if value is not None else None


def _retry_after(headers: Any) -> float | None:
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _why(exc: Exception) -> str:
    """What went wrong under an SDK connection error, whose own text is only "Connection error."
    (httpx's: "[Errno 111] Connection refused", "[Errno -2] Name or service not known")."""
    return str(exc.__cause__ or exc)


def translate(exc: Exception) -> ClaudeError:
    """SDK exception -> switchyard's ClaudeError, transient or permanent."""
    import anthropic

    if isinstance(exc, anthropic.APITimeoutError):
        return TransientClaudeError("request timed out", error_type="timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return TransientClaudeError(f"connection failed: {_why(exc)}", error_type="connection_error")
    if isinstance(exc, anthropic.APIStatusError):
        body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
        raw_err = body.get("error")
        err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
        message = str(err.get("message") or exc.message)
        error_type = str(err.get("type") or type(exc).__name__)
        request_id = _header(exc.response.headers, "request-id") or body.get("request_id")
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers)
        kwargs: dict[str, Any] = dict(status=status, error_type=error_type, request_id=request_id,
                                      retry_after=retry_after)
        text = f"{status} {error_type}: {message}"
        # Retried: what the official SDK retries when left to do it (408 request timeout, 409 lock
        # timeout, 429, every 5xx, 529 overloaded included). switchyard turns the SDK's retries off
        # to own them, in one layer, each attempt recorded; not to change what is retried. One
        # difference, on purpose: a 429 without retry-after is a spend limit, which no wait lifts.
        # Every other 4xx fails at once.
        if status == 429:
            cls = TransientClaudeError if retry_after is not None else PermanentClaudeError
            return cls(text, **kwargs)
        if status in (408, 409) or status >= 500:
            return TransientClaudeError(text, **kwargs)
        return PermanentClaudeError(text, **kwargs)
    raise TypeError(f"not an SDK error: {exc!r}")


def check_endpoint(*, api_key: str, base_url: str | None, models: Mapping[str, str], config: str,
                   timeout_s: float = 10.0) -> None:
    """Ask the Models API once for each model (``GET /v1/models/{id}``: no tokens, no cost), and
    raise ConfigError with one sentence if the endpoint cannot be reached, refuses the key, or does
    not know a model. Entry points call it at start: a job's transient errors are waited out for
    up to an hour (pipeline.flow.stages), which must not be how a wrong key or a wrong URL shows.

    ``models`` maps each tier to check to its model; ``config`` says where they are configured.
    An answer that says only "busy" (429, 5xx) passes: the endpoint is there, and its jobs will
    wait their turn."""
    import anthropic

    where = base_url or "api.anthropic.com"
    tiers_of: dict[str, list[str]] = {}
    for tier, model in models.items():
        tiers_of.setdefault(model, []).append(tier)
    sdk = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0,
                              timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)))
    with sdk:
        for model, tiers in tiers_of.items():
            try:
                sdk.models.retrieve(model)
            except anthropic.APITimeoutError:
                raise ConfigError(f"cannot reach the Claude API at {where} (no answer within {timeout_s:g} s): "
                                  f"check ANTHROPIC_BASE_URL and the network") from None
            except anthropic.APIConnectionError as exc:
                raise ConfigError(f"cannot reach the Claude API at {where} ({_why(exc)}): check ANTHROPIC_BASE_URL "
                                  f"and the network") from None
            except anthropic.APIStatusError as exc:
                err = translate(exc)
                if isinstance(err, TransientClaudeError):
                    log.warning("the Claude API at %s is busy (%s); starting anyway", where, err)
                    return
                if err.status in (401, 403):
                    raise ConfigError(f"the Claude API at {where} refused ANTHROPIC_API_KEY ({err})") from None
                which = f"tier{'s' if len(tiers) > 1 else ''} {', '.join(tiers)}"
                if err.status == 404:
                    raise ConfigError(f"the Claude API at {where} has no model {model!r} ({err}), the model of "
                                      f"{which} in {config}") from None
                raise ConfigError(f"the Claude API at {where} answered {err} when asked for model {model!r} "
                                  f"({which} in {config})") from None


def message_params(*, model: str, system: str, user: str, max_tokens: int, cache_system: bool = False,
                   cache_ttl: str = "5m", output_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The /v1/messages body of a call: what ClaudeClient.call sends, and what economy mode puts
    in a message batch request's ``params`` (pipeline.flow.economy), so both make the same call.

    ``cache_system``: end the system prompt with a cache_control breakpoint, which the API takes
    only on a content block, so the system goes as one text block then; ``cache_ttl`` is the tier's
    configured lifetime ("5m", the API's default, or "1h"), which its price follows.
    ``output_schema``: ask for structured outputs (``output_config.format``)."""
    sent: str | list[TextBlockParam] = system
    if cache_system:
        control: CacheControlEphemeralParam = {"type": "ephemeral"}
        if cache_ttl == "1h":  # the configuration allows "5m" (the API's default) or "1h"
            control["ttl"] = "1h"
        sent = [{"type": "text", "text": system, "cache_control": control}]
    params: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "system": sent,
                              "messages": [{"role": "user", "content": user}]}
    if output_schema is not None:
        output_config: OutputConfigParam = {"format": {"type": "json_schema", "schema": output_schema}}
        params["output_config"] = output_config
    return params


def usage_of(u: Any) -> Usage:
    """The SDK's usage object (or the same as a dict, from a batch result) as a Usage."""
    get = u.get if isinstance(u, dict) else lambda k: getattr(u, k, None)
    creation = get("cache_creation")
    hour = (creation.get("ephemeral_1h_input_tokens") if isinstance(creation, dict)
            else getattr(creation, "ephemeral_1h_input_tokens", None)) if creation is not None else None
    return Usage(
        input_tokens=get("input_tokens") or 0,
        output_tokens=get("output_tokens") or 0,
        cache_creation_input_tokens=get("cache_creation_input_tokens") or 0,
        cache_read_input_tokens=get("cache_read_input_tokens") or 0,
        # A 1-hour write costs more than a 5-minute one (pipeline.claude.pricing).
        cache_creation_1h_input_tokens=(hour or 0) if creation is not None else None,
    )


# What a call needs of an answer: its text, stop reason, usage, and the request id it carries.
Read = tuple[str, str | None, Usage, str | None]


def read_message(raw: Any) -> Read:
    """An answer's body read with orjson, straight from the SDK's raw response: the three fields a
    call needs, without building the SDK's pydantic ``Message`` (its content blocks, usage and
    their validation), which cost more CPU than the rest of the call (bench/sdkcall.py). A body
    that is not the Messages shape is left to the SDK's own parsing, and its errors."""
    try:
        body = orjson.loads(raw.http_response.content)
        u = body["usage"]
        text = "".join(b.get("text") or "" for b in body["content"] if b.get("type") == "text")
        shaped = isinstance(u, dict) and "input_tokens" in u and "output_tokens" in u
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        shaped = False
    if not shaped:
        return _read_sdk(raw.parse())
    return text, body.get("stop_reason"), usage_of(u), None


def _read_sdk(message: Any) -> Read:
    """The same fields from the SDK's parsed ``Message``."""
    text = "".join(getattr(b, "text", "") for b in message.content if b.type == "text")
    return text, message.stop_reason, usage_of(message.usage), getattr(message, "_request_id", None)


class ClaudeClient:
    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout_s: float = 120.0,
        attempts: int = 4,
        max_backoff_s: float = 30.0,
        limiter: RateLimiter | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_connections: int = 1000,
        on_attempt: AttemptObserver | None = None,
        output_reserve: OutputReserve | None = None,
        lean: bool = True,
    ) -> None:
        """``lean``: read an answer's body with orjson (``read_message``) and leave the SDK's
        OpenTelemetry spans off unless the environment configures them (ANTHROPIC_OPEN_TELEMETRY*);
        False: the SDK's own ``Message`` model and its default spans (bench/sdkcall.py times one
        against the other)."""
        self.attempts = max(1, attempts)
        # What a call reserves of its tier's output budget (pipeline.claude.ratelimit.OutputReserve).
        self.output_reserve = output_reserve or OutputReserve()
        self._parse_sdk = not lean
        self.on_attempt = on_attempt
        self.max_backoff_s = max_backoff_s
        self.limiter = limiter or NoLimit()
        self._sleep = sleep
        # httpcore's pool walks every connection it holds on each request and on each response
        # close: with one pool of 500 connections that walk was a third of a 500-thread worker's
        # GIL time (bench/inflight, C=500), quadratic in the calls in flight. So the connections are
        # split into shards of at most SHARD_CONNECTIONS, each with its own SDK client, and every
        # thread keeps to one shard (assigned round robin at its first call): a request walks only
        # its shard's connections, and (with no more threads than max_connections, as the worker
        # sizes it) a shard never has more threads than connections, so no call waits for one.
        shards = max(1, -(-max_connections // SHARD_CONNECTIONS))
        self._per_shard = -(-max_connections // shards)
        self._sdk_options: dict[str, Any] = dict(api_key=api_key, base_url=base_url, max_retries=0,
                                                 timeout=httpx.Timeout(timeout_s, connect=5.0))
        if lean and not any(k.startswith("ANTHROPIC_OPEN_TELEMETRY") for k in os.environ):
            # With no tracer configured each call still built a span and its attributes: CPU for
            # nothing (bench/sdkcall.py). An operator who configures the SDK's tracing gets it.
            self._sdk_options["open_telemetry"] = {"traces": False, "propagation": False}
        # Made at first use: each holds an SSL context, and most processes need one or two.
        self._shards: list[anthropic.Anthropic | None] = [None] * shards
        self._shards_lock = threading.Lock()
        self._next_shard = itertools.count()
        self._local = threading.local()

    @property
    def _sdk(self) -> anthropic.Anthropic:
        """This thread's SDK client (its shard of the connections)."""
        sdk: anthropic.Anthropic | None = getattr(self._local, "sdk", None)
        if sdk is None:
            sdk = self._local.sdk = self._shard(next(self._next_shard) % len(self._shards))
        return sdk

    def _shard(self, i: int) -> anthropic.Anthropic:
        import anthropic

        with self._shards_lock:
            sdk = self._shards[i]
            if sdk is None:
                n = self._per_shard
                http_client = httpx.Client(limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                                           timeout=self._sdk_options["timeout"])
                sdk = self._shards[i] = anthropic.Anthropic(http_client=http_client, **self._sdk_options)
            return sdk

    def close(self) -> None:
        with self._shards_lock:
            for sdk in self._shards:
                if sdk is not None:
                    sdk.close()

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1``: full jitter, never under retry-after."""
        delay = random.uniform(0, min(self.max_backoff_s, BASE_BACKOFF_S * 2 ** (attempt - 1)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def _observe(self, tier: str, model: str, attempt: Attempt) -> None:
        if self.on_attempt is not None:
            self.on_attempt(tier, model, attempt)

    def call(self, *, tier: str, model: str, system: str, user: str, max_tokens: int,
             on_retry: Callable[[int], None] | None = None, cache_system: bool = False,
             cache_ttl: str = "5m", output_schema: dict[str, Any] | None = None) -> CallResult:
        """Make the call, retrying transient failures. ``on_retry(n)`` runs before attempt n > 1:
        the stage renews its claim there, so the sweeper knows a call in its retries is alive.
        ``cache_system``: end the system prompt with a cache_control breakpoint, which the API takes
        only on a content block, so the system goes as one text block then; ``cache_ttl`` is the
        tier's configured lifetime ("5m", the API's default, or "1h"), which its price follows.
        ``output_schema``: ask for structured outputs (``output_config.format``), an answer held
        to that JSON Schema by the decoder. A refusal or a max_tokens stop can still break it, so
        the caller validates the answer as ever."""
        import anthropic

        attempts: list[Attempt] = []
        params = message_params(model=model, system=system, user=user, max_tokens=max_tokens,
                                cache_system=cache_system, cache_ttl=cache_ttl, output_schema=output_schema)
        estimate = (len(system) + len(user)) // 4
        for number in range(1, self.attempts + 1):
            reserved = self.output_reserve.expect(tier, max_tokens)
            try:
                self.limiter.acquire(tier, input_tokens=estimate, output_tokens=reserved)
            except RateLimited as exc:
                raise Deferred(tier, exc.wait_s, attempts) from exc
            if on_retry is not None and number > 1:
                on_retry(number)
            started = datetime.now(UTC)
            t0 = time.perf_counter()
            try:
                raw = self._sdk.messages.with_raw_response.create(**params)
                read = _read_sdk(raw.parse()) if self._parse_sdk else read_message(raw)
            except anthropic.APIError as exc:
                err = translate(exc)
                attempt = Attempt(
                    number=number, started_at=started, finished_at=datetime.now(UTC),
                    latency_ms=(time.perf_counter() - t0) * 1000, ok=False, status_code=err.status,
                    request_id=err.request_id, error_type=err.error_type, error_message=str(err),
                    retry_after=err.retry_after,
                )
                attempts.append(attempt)
                self._observe(tier, model, attempt)
                # A failed request produced no output: give the reserved output tokens back.
                self.limiter.adjust(tier, output_tokens=-reserved)
                retry_after = err.retry_after
                if err.status == 429 and err.retry_after is not None:
                    self.limiter.penalize(tier, retry_after=err.retry_after)
                    if self.limiter.pauses_on_penalty:
                        # The next acquire waits out the pause, or hands the job back if it is long:
                        # sleeping retry-after here would hold the thread whatever its length.
                        retry_after = None
                if isinstance(err, PermanentClaudeError) or number == self.attempts:
                    raise CallFailed(err, attempts) from exc
                self._sleep(self.backoff(number, retry_after))
                continue
            latency = (time.perf_counter() - t0) * 1000
            text, stop_reason, usage, body_request_id = read
            # Settle the reservation: the real input count for the estimate, the real output for
            # max_tokens (pipeline.claude.ratelimit explains why it reserves the worst case). The
            # input count is what the API counts against its limit: cache reads are not.
            self.limiter.adjust(tier, input_tokens=usage.rate_limited_input_tokens - estimate,
                                output_tokens=usage.output_tokens - reserved)
            self.output_reserve.observe(tier, usage.output_tokens)
            attempt = Attempt(
                number=number, started_at=started, finished_at=datetime.now(UTC), latency_ms=latency,
                ok=True, status_code=raw.http_response.status_code,
                request_id=raw.headers.get("request-id") or body_request_id,
                usage=usage, text=text, stop_reason=stop_reason,
            )
            attempts.append(attempt)
            self._observe(tier, model, attempt)
            return CallResult(text=text, stop_reason=stop_reason, attempts=attempts)
        raise AssertionError("unreachable: the loop returns or raises")
