"""Counters and a bounded request log, for benchmarks and tests to look at."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.fake_claude.models import model_class

DEFAULT_LOG_LIMIT = 200_000


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    model: str | None
    purpose: str | None
    status: int  # 0 when the connection was dropped without an answer
    started_at: float
    ended_at: float
    input_tokens: int
    output_tokens: int
    request_id: str
    fault: str | None
    cache: str | None = None  # hit, miss, uncacheable (every breakpoint below the minimum), or None
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The quality model's say on an answered triage, classify or extract call (None otherwise): the
    # job's true difficulty, and whether the answer is wrong (for triage: a noisy verdict).
    true_difficulty: str | None = None
    wrong: bool | None = None
    # The output_config.format schema asked for, as fake_claude.schema_digest names it; None without.
    output_format: str | None = None


_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_CACHE_COUNTERS = ("hits", "misses", "writes", "uncacheable", "read_input_tokens", "creation_input_tokens")


class Recorder:
    def __init__(self, log_limit: int = DEFAULT_LOG_LIMIT, *, quality: dict[str, Any] | None = None) -> None:
        """`quality`: the quality model's settings, shown as they are in the stats."""
        self._quality = quality or {}
        self._lock = threading.Lock()
        self._log: deque[LoggedRequest] = deque(maxlen=log_limit)
        self._in_flight = 0  # survives reset: it is a fact about now, not a counter
        self._clear()

    def _clear(self) -> None:
        self._started_at = time.time()
        self._total = 0
        self._count_tokens = 0
        self._input_tokens = 0
        self._output_tokens = 0
        self._by_model: Counter[str] = Counter()
        self._by_purpose: Counter[str] = Counter()
        self._by_status: Counter[str] = Counter()
        self._by_fault: Counter[str] = Counter()
        self._cache: dict[str, Counter[str]] = {}
        self._judged: Counter[tuple[str, str, str, bool]] = Counter()
        self._max_in_flight = self._in_flight
        self._log.clear()
        self._batches = 0
        self._batch_requests = 0
        self._batch_results: Counter[str] = Counter()
        self._batch_by_model: Counter[str] = Counter()
        self._batch_tokens: Counter[str] = Counter(dict.fromkeys(_USAGE_FIELDS, 0))

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def arrived(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def finished(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._in_flight -= 1
            self._total += 1
            self._input_tokens += entry.input_tokens
            self._output_tokens += entry.output_tokens
            self._by_model[entry.model or "(none)"] += 1
            self._by_purpose[entry.purpose or "(none)"] += 1
            self._by_status[str(entry.status)] += 1
            if entry.fault:
                self._by_fault[entry.fault] += 1
            if entry.cache is not None and entry.model is not None:
                self._count_cache(entry)
            if entry.wrong is not None and entry.true_difficulty is not None:
                key = (entry.purpose or "", model_class(entry.model or "") or "", entry.true_difficulty, entry.wrong)
                self._judged[key] += 1
            self._log.append(entry)

    def _count_cache(self, entry: LoggedRequest) -> None:
        counts = self._cache.setdefault(entry.model or "", Counter(dict.fromkeys(_CACHE_COUNTERS, 0)))
        counts[{"hit": "hits", "miss": "misses"}.get(entry.cache or "", "uncacheable")] += 1
        if entry.cache_creation_input_tokens:
            counts["writes"] += 1
        counts["read_input_tokens"] += entry.cache_read_input_tokens
        counts["creation_input_tokens"] += entry.cache_creation_input_tokens

    def batch_created(self, requests: int) -> None:
        with self._lock:
            self._batches += 1
            self._batch_requests += requests

    def batch_result(self, result_type: str, *, count: int = 1, model: str | None = None,
                     usage: dict[str, int] | None = None, judged: tuple[str, str, bool] | None = None) -> None:
        """`count` requests of a message batch ended as `result_type`; `usage` is a succeeded one's,
        `judged` the quality model's say on its answer (purpose, true difficulty, wrong): counted
        with the synchronous answers, as the same model gave it."""
        with self._lock:
            self._batch_results[result_type] += count
            if model is not None:
                self._batch_by_model[model] += count
                if judged is not None:
                    purpose, difficulty, wrong = judged
                    self._judged[(purpose, model_class(model) or "", difficulty, wrong)] += 1
            for name, value in (usage or {}).items():
                if name in _USAGE_FIELDS:
                    self._batch_tokens[name] += value

    def counted_tokens(self) -> None:
        with self._lock:
            self._count_tokens += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": self._total,
                "by_model": dict(self._by_model),
                "by_purpose": dict(self._by_purpose),
                "by_status": dict(self._by_status),
                "by_fault": dict(self._by_fault),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "input_tokens": self._input_tokens,
                "output_tokens": self._output_tokens,
                "count_tokens_requests": self._count_tokens,
                # Message batches, apart: none of their requests is in the counts above (`total`
                # is synchronous POST /v1/messages only), in the request log or the rate limits.
                "batches": {
                    "created": self._batches,
                    "requests": self._batch_requests,
                    "results": dict(self._batch_results),
                    "by_model": dict(self._batch_by_model),
                    **self._batch_tokens,
                },
                # Per model, over answered requests with a cache_control breakpoint: hits read a
                # prefix, misses did not (and usually wrote one), writes wrote one; the hit rate a
                # benchmark wants is read / (read + creation) input tokens.
                "cache": {model: dict(counts) for model, counts in self._cache.items()},
                # The quality model's settings, and its answers served (synchronous and in batches):
                # per purpose, model class and true difficulty, how many were right and how many wrong.
                "quality": {**self._quality, "answers": self._answers()},
                "since": self._started_at,
            }

    def _answers(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (purpose, klass, difficulty, wrong), count in sorted(self._judged.items()):
            counts = out.setdefault(purpose, {}).setdefault(klass, {}).setdefault(
                difficulty, {"right": 0, "wrong": 0})
            counts["wrong" if wrong else "right"] += count
        return out

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            entries = list(self._log)
        return [asdict(e) for e in entries]
