"""A rate-limit budget per tier, shared by every worker process of that tier, kept in Redis.

Anthropic limits requests, input tokens and output tokens per minute for each model class across
the whole organisation, so the budget cannot live in a worker (Celery's ``rate_limit`` is per
worker). Each tier has three token buckets in one Redis hash; a Lua script refills them and takes
a reservation from all three atomically, so any number of workers on any number of hosts share one
budget. Time comes from Redis (``TIME``), not from the workers' clocks, which may disagree.

Reservations, not polling: ``reserve`` takes the tokens at once, letting a bucket go into debt, and
answers how long the caller must wait for its turn. Waiters are thus served in order and spaced
exactly by the refill rate, with no thundering herd of retries against Redis.

Holding a pool slot: a reservation that would wait longer than ``max_wait_s`` is refused and takes
nothing; ``acquire`` raises ``RateLimited`` and the stage hands the job back to its queue with a
countdown (pipeline.flow.stages), freeing the thread for work that can run. Short waits are slept in
the thread: handing back costs two database transactions and a broker round trip, more than a few
seconds of an idle thread, and a worker serves a single tier, so the threads it would free could
only take more jobs that wait for the same budget. ``max_wait_s`` stays far below the sweeper's
stage deadline, so a waiting job is never mistaken for a stalled one.

Output tokens are only known after the call. ``acquire`` reserves ``max_tokens`` up front and
``adjust`` refunds the difference afterwards (and corrects the input estimate). Charging only
afterwards would let every thread start at once against an empty output budget and overshoot by up
to concurrency x max_tokens; reserving the worst case never overshoots, and the API itself counts
output tokens the same way (estimated from max_tokens, adjusted at the end).

Input tokens, as the API counts them against its limit, are the uncached input and the cache
writes; cache reads are not counted. The reservation is the whole prompt's estimate, since which
part will be read from the cache is only known afterwards; ``adjust`` gives the cache reads back
(``Usage.rate_limited_input_tokens``), so a tier whose prompts mostly hit the cache gets through
as many more calls as the API allows.

A 429 with ``retry-after`` means the organisation's real budget is spent (other clients share it,
or our limits are set too high). ``penalize`` then pauses the tier for everyone: a key with that
expiry, which every reservation waits out, and the request bucket drained so that the tier resumes
at its steady rate instead of with a burst that would earn the next 429.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.errors import ConfigError, RateLimited

PREFIX = "switchyard:ratelimit"
KINDS = ("rpm", "itpm", "otpm")

# Shared by the scripts below. `now`: the caller's clock in ms, or Redis's own when ARGV[1] < 0 (so
# workers on different hosts agree). `refill`: a bucket's level after refilling up to `now`.
_PRELUDE = """
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function refill(name, limit, rate)
  local level = tonumber(redis.call('HGET', KEYS[1], name .. 'l'))
  local at = tonumber(redis.call('HGET', KEYS[1], name .. 't'))
  if level == nil or at == nil then return limit, now end
  if now > at then return math.min(limit, level + (now - at) * rate), now end
  return level, at
end
"""

# KEYS: bucket hash, pause key. ARGV: now_ms (<0: use Redis TIME), window_ms, max_wait_ms, then
# (limit, amount) for requests, input tokens, output tokens; limit 0 means unlimited.
# Returns {granted (0/1), wait_ms}.
_RESERVE = _PRELUDE + """
local window = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local wait = 0
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then wait = pause end
local names = {'r', 'i', 'o'}
local new_levels = {}
local new_ats = {}
local ttl = 0
for n = 1, 3 do
  local limit = tonumber(ARGV[2 + 2 * n])
  local amount = tonumber(ARGV[3 + 2 * n])
  if limit > 0 then
    local rate = limit / window
    local level, at = refill(names[n], limit, rate)
    -- A request bigger than the whole bucket waits for a full bucket, not forever.
    local after = level - math.min(amount, limit)
    local w = (at - now) + math.max(0, -after) / rate
    if w > wait then wait = w end
    new_levels[n] = after
    new_ats[n] = at
    local full = (at - now) + (limit - after) / rate
    if full > ttl then ttl = full end
  end
end
if wait > max_wait then
  return {0, math.ceil(wait)}
end
for n = 1, 3 do
  if new_levels[n] ~= nil then
    redis.call('HSET', KEYS[1], names[n] .. 'l', tostring(new_levels[n]), names[n] .. 't', tostring(new_ats[n]))
  end
end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(ttl) + 1000) end
return {1, math.ceil(wait)}
"""

# KEYS: bucket hash. ARGV: now_ms, window_ms, then (limit, delta) for the three buckets: a positive
# delta takes more tokens, a negative one gives tokens back (never above the limit).
_ADJUST = _PRELUDE + """
local window = tonumber(ARGV[2])
local names = {'r', 'i', 'o'}
for n = 1, 3 do
  local limit = tonumber(ARGV[1 + 2 * n])
  local delta = tonumber(ARGV[2 + 2 * n])
  if limit > 0 and delta ~= 0 then
    local rate = limit / window
    local level, at = refill(names[n], limit, rate)
    level = math.min(limit, level - delta)
    redis.call('HSET', KEYS[1], names[n] .. 'l', tostring(level), names[n] .. 't', tostring(at))
  end
end
return 1
"""

# KEYS: bucket hash, pause key. ARGV: now_ms, pause_ms. Extends the pause (never shortens it) and
# drains the request bucket until the pause ends.
_PENALIZE = _PRELUDE + """
local pause = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[2])
if left < pause then
  redis.call('SET', KEYS[2], tostring(now + pause), 'PX', pause)
end
local level = tonumber(redis.call('HGET', KEYS[1], 'rl'))
local at = tonumber(redis.call('HGET', KEYS[1], 'rt'))
if level ~= nil and at ~= nil then
  if level > 0 then level = 0 end
  if at < now + pause then at = now + pause end
  redis.call('HSET', KEYS[1], 'rl', tostring(level), 'rt', tostring(at))
end
return math.max(left, pause)
"""


@dataclass(frozen=True)
class TierLimits:
    """Per window (a minute, unless a test shortens it); 0 means unlimited."""

    rpm: int = 0
    itpm: int = 0
    otpm: int = 0


def parse_overrides(spec: str | None, tiers: Mapping[str, TierLimits]) -> dict[str, TierLimits]:
    """Apply ``SWITCHYARD_RATE_LIMITS`` ("sonnet.rpm=50,opus.otpm=8000") on top of ``tiers``."""
    out = dict(tiers)
    if not spec:
        return out
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, value = part.partition("=")
        tier, _, kind = name.strip().partition(".")
        digits = value.strip()
        # ASCII digits only (str.isdigit also takes '²', which int() refuses), and few enough of
        # them for int() (which refuses thousands) and for the Lua script's numbers.
        if tier not in out or kind not in KINDS or not (digits.isascii() and digits.isdigit()) or len(digits) > 15:
            raise ConfigError(
                f"SWITCHYARD_RATE_LIMITS: {part!r} is not TIER.KIND=N with TIER one of {', '.join(sorted(out))} "
                f"and KIND one of {', '.join(KINDS)}")
        out[tier] = TierLimits(**{**out[tier].__dict__, kind: int(digits)})
    return out


OUTPUT_RESERVE_MODES = ("max_tokens", "observed")


class OutputReserve:
    """How many output tokens a call reserves before it is sent (SWITCHYARD_RATE_OUTPUT_RESERVE).

    ``max_tokens`` (the default): the worst case, which never overshoots, and is how Anthropic
    documents its own accounting of OTPM (estimated from max_tokens at the start of a request,
    adjusted at its end): reserving less would only move the 429s to the API.

    ``observed``: the mean output of the tier's last ``keep`` answers in this process (the full
    max_tokens until ``warm`` have been seen), never more than max_tokens; the adjustment after
    the call settles the difference either way. For a limit counted on the tokens actually produced
    (the fake Claude's, and any proxy that counts so), when answers are far shorter than max_tokens:
    a budget of B output tokens then holds about B / (mean answer) calls in flight instead of
    B / max_tokens, which is what lets an OTPM-bound tier run at its limit at all when the calls
    are slow (bench/ratelimit.py). The mean, not the largest: what calls in flight hold beyond what
    they produce is budget nobody uses, and reserving the largest answer left a fifth of an OTPM
    limit idle (measured). Calls in flight produce about what they reserved in sum; the few tokens
    over, until the adjustment, fall within the margin the limits are configured with, and a 429
    pauses the tier as any other."""

    def __init__(self, mode: str = "max_tokens", *, keep: int = 200, warm: int = 5) -> None:
        if mode not in OUTPUT_RESERVE_MODES:
            raise ConfigError(f"SWITCHYARD_RATE_OUTPUT_RESERVE: {mode!r} is not one of "
                              f"{', '.join(OUTPUT_RESERVE_MODES)}")
        self.mode, self.keep, self.warm = mode, keep, warm
        self._seen: dict[str, deque[int]] = {}
        self._lock = threading.Lock()

    def expect(self, tier: str, max_tokens: int) -> int:
        if self.mode == "max_tokens":
            return max_tokens
        with self._lock:
            seen = self._seen.get(tier)
            if seen is None or len(seen) < self.warm:
                return max_tokens
            return min(max_tokens, math.ceil(sum(seen) / len(seen)))

    def observe(self, tier: str, output_tokens: int) -> None:
        if self.mode == "max_tokens":
            return
        with self._lock:
            self._seen.setdefault(tier, deque(maxlen=self.keep)).append(output_tokens)


@dataclass(frozen=True)
class Reservation:
    granted: bool
    wait_s: float


class RedisRateLimiter:
    """The ``RateLimiter`` of pipeline.claude.client, global across processes through Redis."""

    pauses_on_penalty = True

    def __init__(
        self,
        client: redis.Redis,
        limits: Mapping[str, TierLimits],
        *,
        window_s: float = 60.0,
        max_wait_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.redis = client
        self.limits = dict(limits)
        self.window_ms = window_s * 1000
        self.max_wait_s = max_wait_s
        self._sleep = sleep
        self._on_wait = on_wait
        self._reserve = client.register_script(_RESERVE)
        self._adjust = client.register_script(_ADJUST)
        self._penalize = client.register_script(_PENALIZE)

    @classmethod
    def from_url(cls, url: str, limits: Mapping[str, TierLimits], **kwargs: Any) -> RedisRateLimiter:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)
        return cls(client, limits, **kwargs)

    @staticmethod
    def keys(tier: str) -> list[str]:
        return [f"{PREFIX}:{tier}:buckets", f"{PREFIX}:{tier}:paused"]

    def _pairs(self, tier: str, *amounts: int) -> list[float]:
        lim = self.limits.get(tier, TierLimits())
        return [lim.rpm, amounts[0], lim.itpm, amounts[1], lim.otpm, amounts[2]]

    def reserve(self, tier: str, *, input_tokens: int, output_tokens: int, max_wait_s: float | None = None,
                now_ms: float = -1) -> Reservation:
        """Take one request and the tokens if the wait for them is at most ``max_wait_s``."""
        bound = self.max_wait_s if max_wait_s is None else max_wait_s
        granted, wait_ms = self._reserve(keys=self.keys(tier), args=[
            now_ms, self.window_ms, bound * 1000, *self._pairs(tier, 1, input_tokens, output_tokens)])
        return Reservation(bool(granted), int(wait_ms) / 1000)

    def paused_for(self, tier: str) -> float:
        """Seconds left of a 429 pause on ``tier`` (0 if none)."""
        left = int(self.redis.pttl(self.keys(tier)[1]))
        return max(0, left) / 1000

    def acquire(self, tier: str, *, input_tokens: int, output_tokens: int) -> float:
        """Wait for a turn within the tier's budget; return the seconds waited.

        Raises RateLimited, having taken nothing, if the turn is further off than ``max_wait_s``."""
        started = time.monotonic()
        r = self.reserve(tier, input_tokens=input_tokens, output_tokens=output_tokens)
        if not r.granted:
            raise RateLimited(tier, r.wait_s)
        if r.wait_s <= 0:
            return 0.0  # the script saw no pause, and there was no wait for one to begin in
        self._sleep(r.wait_s)
        # A 429 may have paused the tier while this reservation was waiting its turn.
        while (left := self.paused_for(tier)) > 0:
            if time.monotonic() - started + left > self.max_wait_s:
                raise RateLimited(tier, left)
            # Jitter, so the tier's waiters do not all fire in the same millisecond at the end.
            self._sleep(left + random.uniform(0, 0.05))
        waited = time.monotonic() - started
        if self._on_wait is not None and waited > 0.001:
            self._on_wait(tier, waited)
        return waited

    def adjust(self, tier: str, *, input_tokens: int = 0, output_tokens: int = 0, now_ms: float = -1) -> None:
        """Correct a reservation once the usage is known: negative gives tokens back."""
        lim = self.limits.get(tier, TierLimits())
        if (input_tokens and lim.itpm) or (output_tokens and lim.otpm):
            self._adjust(keys=self.keys(tier)[:1],
                         args=[now_ms, self.window_ms, *self._pairs(tier, 0, input_tokens, output_tokens)])

    def penalize(self, tier: str, *, retry_after: float, now_ms: float = -1) -> None:
        """Pause the tier for everyone for ``retry_after`` seconds (a 429 said so)."""
        pause_ms = max(1, math.ceil(retry_after * 1000))
        self._penalize(keys=self.keys(tier), args=[now_ms, pause_ms])

    def levels(self, tier: str) -> dict[str, Any]:
        """What `switchyard status` shows: the limits, the tokens left, any pause."""
        lim = self.limits.get(tier, TierLimits())
        raw = {(k.decode() if isinstance(k, bytes) else str(k)): float(v)
               for k, v in self.redis.hgetall(self.keys(tier)[0]).items()}
        return {"rpm": lim.rpm, "itpm": lim.itpm, "otpm": lim.otpm, "paused_s": self.paused_for(tier),
                "requests_left": raw.get("rl"), "input_tokens_left": raw.get("il"),
                "output_tokens_left": raw.get("ol")}
