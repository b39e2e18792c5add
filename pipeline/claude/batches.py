"""The Message Batches API, through the official SDK: what economy mode (pipeline.flow.economy)
sends and reads, and how a batch result becomes the same CallResult or CallFailed a synchronous
call gives.

The SDK is built with ``max_retries=0`` here too: a create retried by the SDK after a timeout
could create the batch twice and pay for its requests twice. A failed create is instead left to
the reconciliation in pipeline.flow.economy, which asks the API's list what was created.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx2 as httpx

from pipeline.claude.client import Attempt, CallResult, translate, usage_of
from pipeline.errors import CallFailed, ClaudeError, PermanentClaudeError, TransientClaudeError

# An errored result carries the API's error object, not an HTTP status: the status each type
# answers with synchronously, so it is recorded and retried the same way.
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
                "overloaded_error": 529}
# Worth another try in a later batch: what a synchronous call retries (a 429 in a batch is the
# batch queue's own limit, which lifts, so it is retried too).
TRANSIENT_TYPES = frozenset({"api_error", "overloaded_error", "rate_limit_error"})


@dataclass(frozen=True)
class BatchInfo:
    """A message batch as the API describes it."""

    id: str
    status: str  # in_progress | canceling | ended
    counts: dict[str, int]
    created_at: datetime

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _info(b: Any) -> BatchInfo:
    counts = b.request_counts
    created = b.created_at if b.created_at.tzinfo else b.created_at.replace(tzinfo=UTC)
    return BatchInfo(id=b.id, status=b.processing_status, created_at=created,
                     counts={k: int(getattr(counts, k) or 0)
                             for k in ("processing", "succeeded", "errored", "canceled", "expired")})


class BatchClient:
    """The five calls economy mode makes. Each raises ClaudeError (translate) on an API error."""

    def __init__(self, *, api_key: str, base_url: str | None = None, timeout_s: float = 60.0) -> None:
        import anthropic  # here, not at the top: see pipeline.claude.client

        self._sdk = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0,
                                        timeout=httpx.Timeout(timeout_s, connect=5.0))

    def close(self) -> None:
        self._sdk.close()

    def _do(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import anthropic

        try:
            return fn(*args, **kwargs)
        except anthropic.APIError as exc:
            raise translate(exc) from exc

    def create(self, requests: list[dict[str, Any]]) -> BatchInfo:
        return _info(self._do(self._sdk.messages.batches.create, requests=requests))

    def retrieve(self, batch_id: str) -> BatchInfo:
        return _info(self._do(self._sdk.messages.batches.retrieve, batch_id))

    def cancel(self, batch_id: str) -> BatchInfo:
        return _info(self._do(self._sdk.messages.batches.cancel, batch_id))

    def created_since(self, since: datetime) -> list[BatchInfo]:
        """The batches created at or after ``since``: the list is newest first, so paging stops at
        the first one older."""
        out: list[BatchInfo] = []
        page = self._do(self._sdk.messages.batches.list, limit=100)
        while True:
            for b in page.data:
                info = _info(b)
                if info.created_at < since:
                    return out
                out.append(info)
            if not page.has_next_page():
                return out
            page = self._do(page.get_next_page)

    def results(self, batch_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(custom_id, result object) for each request, in the API's order (any)."""
        for line in self._do(self._sdk.messages.batches.results, batch_id):
            yield line.custom_id, line.result.model_dump(mode="json", exclude_none=False)


def outcome_of(result: dict[str, Any], *, submitted_at: datetime, result_at: datetime, message_batch_id: str | None,
               request_id: int) -> CallResult | CallFailed:
    """A stored succeeded or errored result as a synchronous call's outcome: one attempt, its
    latency from the batch's submission to the result, the message batch on it."""
    latency_ms = max(0.0, (result_at - submitted_at).total_seconds() * 1000)
    common: dict[str, Any] = dict(number=1, started_at=submitted_at, finished_at=result_at, latency_ms=latency_ms,
                                  message_batch_id=message_batch_id, economy_request_id=request_id)
    if result.get("type") == "succeeded":
        message = result.get("message") or {}
        text = "".join(b.get("text", "") for b in message.get("content") or [] if b.get("type") == "text")
        stop = message.get("stop_reason")
        attempt = Attempt(ok=True, status_code=200, request_id=message.get("id"),
                          usage=usage_of(message.get("usage") or {}), text=text, stop_reason=stop, **common)
        return CallResult(text=text, stop_reason=stop, attempts=[attempt])
    body: dict[str, Any] = result.get("error") or {}
    inner = body.get("error")
    err: dict[str, Any] = inner if isinstance(inner, dict) else body
    error_type = str(err.get("type") or "api_error")
    status = ERROR_STATUS.get(error_type, 500)
    text = f"{status} {error_type}: {err.get('message') or 'errored in a message batch'}"
    cls: type[ClaudeError] = TransientClaudeError if error_type in TRANSIENT_TYPES else PermanentClaudeError
    cause = cls(text, status=status, error_type=error_type, request_id=body.get("request_id"))
    attempt = Attempt(ok=False, status_code=status, request_id=body.get("request_id"), error_type=error_type,
                      error_message=text, **common)
    return CallFailed(cause, [attempt])
