"""Per-model-class token buckets for requests, input tokens and output tokens per minute.

Time comes in as an argument so the logic stays testable without sleeping.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

# What the headers report for a limit that is not enforced: generous, like a high usage tier.
_NOMINAL = {"requests": 4_000, "input-tokens": 2_000_000, "output-tokens": 400_000}


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float
    window_s: float = 60.0

    @property
    def rate(self) -> float:  # refill per second: the whole capacity every window (a minute)
        return self.capacity / self.window_s

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` fits; a request larger than the bucket waits for a full one."""
        need = min(amount, self.capacity)
        return max(0.0, (need - self.level) / self.rate)

    def full_at(self, now: float) -> float:
        return now + max(0.0, self.capacity - self.level) / self.rate


@dataclass(frozen=True)
class Admission:
    allowed: bool
    retry_after_s: float  # 0 when allowed


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimiter:
    def __init__(self, rpm: int | None, itpm: int | None, otpm: int | None, *, window_s: float = 60.0) -> None:
        """``window_s``: the limits are per this many seconds; a minute, as the API's, unless a
        short benchmark or test shrinks it."""
        self._limits = {"requests": rpm, "input-tokens": itpm, "output-tokens": otpm}
        self._window_s = window_s
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()

    def _bucket(self, model_class: str, kind: str, now: float) -> _Bucket | None:
        limit = self._limits[kind]
        if limit is None:
            return None
        bucket = self._buckets.get((model_class, kind))
        if bucket is None:
            bucket = self._buckets[(model_class, kind)] = _Bucket(float(limit), float(limit), now,
                                                                       self._window_s)
        bucket.refill(now)
        return bucket

    def admit(self, model_class: str, input_tokens: int, now: float) -> Admission:
        """Take one request and the input tokens, or say how long to wait. Output tokens are only
        known after answering, so admission just needs the output bucket not to be in debt."""
        with self._lock:
            needs = {"requests": 1.0, "input-tokens": float(input_tokens), "output-tokens": 1.0}
            waits = []
            for kind, amount in needs.items():
                bucket = self._bucket(model_class, kind, now)
                if bucket is not None:
                    waits.append(bucket.wait_for(amount))
            wait = max(waits, default=0.0)
            if wait > 0:
                return Admission(False, wait)
            for kind in ("requests", "input-tokens"):
                bucket = self._bucket(model_class, kind, now)
                if bucket is not None:
                    bucket.level -= needs[kind]
            return Admission(True, 0.0)

    def charge_output(self, model_class: str, output_tokens: int, now: float) -> None:
        with self._lock:
            bucket = self._bucket(model_class, "output-tokens", now)
            if bucket is not None:
                bucket.level -= output_tokens  # may go negative: a debt later requests wait out

    def headers(self, model_class: str | None, now: float) -> dict[str, str]:
        out: dict[str, str] = {}
        with self._lock:
            for kind, limit in self._limits.items():
                bucket = self._bucket(model_class, kind, now) if model_class else None
                if bucket is None:
                    shown_limit, remaining, reset = limit or _NOMINAL[kind], limit or _NOMINAL[kind], now
                else:
                    shown_limit = int(bucket.capacity)
                    remaining, reset = max(0, math.floor(bucket.level)), bucket.full_at(now)
                prefix = f"anthropic-ratelimit-{kind}"
                out[f"{prefix}-limit"] = str(shown_limit)
                out[f"{prefix}-remaining"] = str(remaining)
                out[f"{prefix}-reset"] = rfc3339(reset)
        return out
