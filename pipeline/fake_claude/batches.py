"""The Message Batches API: create, retrieve, list, cancel, delete and results, in the API's shapes.

A batch ends `batch_delay_s` after its creation (FakeOptions): its requests are processed then, in
order, by the same Responder that answers POST /v1/messages (same checks, cache and quality model,
so a request gets the same answer in a batch as synchronously), but outside the synchronous rate
limits, fault rate and request log. Until it ends every request counts as processing, as on the API.
Processing happens on one background thread (FakeClaude runs `advance`), in chunks, so that a
cancel or a poll is never held up by a large batch for long.

Memory: a request is kept as its params' JSON bytes until processed, then as its result line's
bytes; nothing else per request but its custom_id.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.fake_claude.errors import RequestInvalid, error_body, invalid, new_batch_id, new_request_id
from pipeline.fake_claude.options import BATCH_OUTCOMES
from pipeline.fake_claude.responder import BatchAnswer, Responder, Response, page_of
from pipeline.fake_claude.stats import Recorder
from pipeline.fake_claude.validation import check_headers

MAX_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
EXPIRY_S = 24 * 3600.0  # unprocessed requests expire 24 h after the batch's creation
# How long a cancelled batch stays `canceling` at most before it ends (never past its own end).
CANCEL_GRACE_S = 1.0
_CHUNK = 256  # requests processed per turn of the lock
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
RESULT_TYPES: tuple[str, ...] = ("succeeded", *BATCH_OUTCOMES)


@dataclass
class _Batch:
    id: str
    created_at: float
    ends_at: float  # when processing starts: creation + delay, earlier once cancelled
    expires_at: float
    custom_ids: list[str]
    # Per request: its params' JSON until processed, then its result line (JSON, no newline).
    items: list[bytes]
    processed: int = 0  # items[:processed] are result lines
    counts: Counter[str] = field(default_factory=Counter)
    cancel_initiated_at: float | None = None
    ended_at: float | None = None

    @property
    def status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"


class BatchStore:
    """Every batch the fake holds, and their processing. Thread-safe."""

    def __init__(self, *, delay_s: float, error_rates: Mapping[str, float], seed: int) -> None:
        self._delay_s = delay_s
        self._rates = dict(error_rates)
        self._seed = seed
        self._lock = threading.Lock()
        self._batches: dict[str, _Batch] = {}  # in creation order: the list shows it reversed
        # One draw per processed request, in processing order, so that a seed fixes the outcomes.
        self._rng = random.Random(seed + 2)

    def reset(self) -> None:
        with self._lock:
            self._batches.clear()
            self._rng.seed(self._seed + 2)

    # -- endpoints -------------------------------------------------------------------------------

    def create(self, body: Any, *, now: float, base_url: str) -> dict[str, Any]:
        """POST /v1/messages/batches; RequestInvalid for a malformed envelope. Each request's params
        are checked when it is processed, and a bad one ends errored, as on the API."""
        custom_ids, items = _read_requests(body)
        # A delay past the expiry ends the batch at its expiry, every request expired.
        batch = _Batch(id=new_batch_id(), created_at=now, ends_at=now + min(self._delay_s, EXPIRY_S),
                       expires_at=now + EXPIRY_S, custom_ids=custom_ids, items=items)
        with self._lock:
            self._batches[batch.id] = batch
            return _describe(batch, base_url)

    def retrieve(self, batch_id: str, *, base_url: str) -> dict[str, Any]:
        with self._lock:
            return _describe(self._get(batch_id), base_url)

    def newest_first(self, *, base_url: str) -> list[dict[str, Any]]:
        """Every batch, newest first, as the API lists them."""
        with self._lock:
            return [_describe(b, base_url) for b in reversed(self._batches.values())]

    def cancel(self, batch_id: str, *, now: float, base_url: str) -> dict[str, Any]:
        """Unprocessed requests end canceled, within CANCEL_GRACE_S; an ended batch is left as it is."""
        with self._lock:
            batch = self._get(batch_id)
            if batch.ended_at is None and batch.cancel_initiated_at is None:
                batch.cancel_initiated_at = now
                batch.ends_at = min(batch.ends_at, now + CANCEL_GRACE_S)
            return _describe(batch, base_url)

    def delete(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self._get(batch_id)
            if batch.ended_at is None:
                raise invalid(f"message batch {batch_id} is still {batch.status}: it can be deleted only once "
                              "it has ended (cancel it first)")
            del self._batches[batch_id]
        return {"id": batch_id, "type": "message_batch_deleted"}

    def results(self, batch_id: str) -> list[bytes]:
        """The result lines, in an order shuffled per batch (the same on every download)."""
        with self._lock:
            batch = self._get(batch_id)
            if batch.ended_at is None:
                raise invalid(f"message batch {batch_id} is still {batch.status}: its results are available "
                              "once processing_status is ended")
            lines = list(batch.items)
        random.Random(f"{self._seed}:{batch_id}").shuffle(lines)
        return lines

    # -- processing ------------------------------------------------------------------------------

    def advance(self, responder: Responder, recorder: Recorder, now: float) -> bool:
        """Process one chunk of a batch that is due, or end a due one, counting the results in
        `recorder`; False when nothing is due (the caller sleeps a little then)."""
        with self._lock:
            batch = next((b for b in self._batches.values() if b.ended_at is None and b.ends_at <= now), None)
            if batch is None:
                return False
            start = batch.processed
            if batch.cancel_initiated_at is not None or now >= batch.expires_at:
                ending = "canceled" if batch.cancel_initiated_at is not None else "expired"
                recorder.batch_result(ending, count=len(batch.items) - start)
                self._end(batch, ending, now)
                return True
            chunk = batch.items[start:start + _CHUNK]
            drawn = [self._draw() for _ in chunk]
        # Outside the lock: polls and cancels go on meanwhile. Only this thread processes.
        answers = [responder.batch_request(json.loads(params), now=now, drawn=outcome)
                   for params, outcome in zip(chunk, drawn, strict=True)]
        with self._lock:
            for offset, answer in enumerate(answers):
                line = {"custom_id": batch.custom_ids[start + offset], "result": answer.result}
                batch.items[start + offset] = json.dumps(line, ensure_ascii=False).encode()
                batch.counts[answer.result["type"]] += 1
                _record(recorder, answer)
            batch.processed = start + len(answers)
            if batch.processed == len(batch.items):
                batch.ended_at = now
        return True

    def _end(self, batch: _Batch, result_type: str, now: float) -> None:
        """The requests not processed yet end as `result_type` (canceled or expired)."""
        for index in range(batch.processed, len(batch.items)):
            line = {"custom_id": batch.custom_ids[index], "result": {"type": result_type}}
            batch.items[index] = json.dumps(line).encode()
        batch.counts[result_type] += len(batch.items) - batch.processed
        batch.processed = len(batch.items)
        batch.ended_at = now

    def _draw(self) -> str | None:
        roll = self._rng.random()
        for name in BATCH_OUTCOMES:
            rate = self._rates.get(name, 0.0)
            if roll < rate:
                return name
            roll -= rate
        return None

    def _get(self, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise RequestInvalid(404, "not_found_error", f"message batch {batch_id} not found")
        return batch


def _record(recorder: Recorder, answer: BatchAnswer) -> None:
    judged = answer.judged
    recorder.batch_result(answer.result["type"], model=answer.model, usage=answer.usage,
                          judged=(answer.purpose or "", judged.difficulty, judged.wrong) if judged else None)


def _read_requests(body: Any) -> tuple[list[str], list[bytes]]:
    if not isinstance(body, dict):
        raise invalid("body: Input should be a JSON object")
    requests = body.get("requests")
    if not isinstance(requests, list):
        raise invalid("requests: Field required, a list of {custom_id, params}")
    if not requests:
        raise invalid("requests: a message batch needs at least one request")
    if len(requests) > MAX_REQUESTS:
        raise RequestInvalid(413, "request_too_large",
                             f"requests: {len(requests):,} requests, more than the {MAX_REQUESTS:,} a batch takes")
    custom_ids: list[str] = []
    items: list[bytes] = []
    seen: dict[str, int] = {}
    for index, request in enumerate(requests):
        where = f"requests.{index}"
        if not isinstance(request, dict):
            raise invalid(f"{where}: Input should be an object with custom_id and params")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
            raise invalid(f"{where}.custom_id: should be 1 to 64 characters of letters, digits, _ and -, "
                          f"got {json.dumps(custom_id)[:80]}")
        if custom_id in seen:
            raise invalid(f"{where}.custom_id: {custom_id!r} is already the custom_id of requests.{seen[custom_id]}; "
                          "custom_id must be unique within a batch")
        seen[custom_id] = index
        params = request.get("params")
        if not isinstance(params, dict):
            raise invalid(f"{where}.params: Input should be a JSON object (a /v1/messages body)")
        extra = sorted(set(request) - {"custom_id", "params"})
        if extra:
            raise invalid(f"{where}.{extra[0]}: Extra inputs are not permitted")
        custom_ids.append(custom_id)
        items.append(json.dumps(params, ensure_ascii=False).encode())
    return custom_ids, items


def _describe(batch: _Batch, base_url: str) -> dict[str, Any]:
    ended = batch.ended_at is not None
    counts = {name: batch.counts[name] if ended else 0 for name in RESULT_TYPES}
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": batch.status,
        # As on the API: every request is `processing` until the whole batch has ended.
        "request_counts": {"processing": 0 if ended else len(batch.items), **counts},
        "created_at": rfc3339(batch.created_at),
        "expires_at": rfc3339(batch.expires_at),
        "ended_at": rfc3339(batch.ended_at) if ended else None,
        "cancel_initiated_at": rfc3339(batch.cancel_initiated_at) if batch.cancel_initiated_at else None,
        "archived_at": None,
        "results_url": f"{base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class JsonLines:
    """A response body sent as JSON Lines (the results), not as one JSON document."""

    lines: list[bytes]


_BATCHES = "/v1/messages/batches"


def is_batch_path(path: str) -> bool:
    return path == _BATCHES or path.startswith(_BATCHES + "/")


class BatchApi:
    """The HTTP face of a BatchStore: routes, header checks and error bodies; the server only moves
    bytes."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store

    def handle(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: Any,
               *, responder: Responder, recorder: Recorder, now: float, base_url: str) -> Response:
        """`body` is the parsed JSON of a POST (None otherwise); `path` passed is_batch_path."""
        request_id = new_request_id()
        try:
            check_headers(headers, responder.options.api_key)
            answer = self._route(method, path.removeprefix(_BATCHES).strip("/").split("/"), query, body,
                                 recorder=recorder, now=now, base_url=base_url)
        except RequestInvalid as exc:
            return Response(exc.status, {"request-id": request_id},
                            error_body(exc.error_type, exc.message, request_id))
        return Response(200, {"request-id": request_id}, answer)

    def _route(self, method: str, parts: list[str], query: Mapping[str, str], body: Any, *,
               recorder: Recorder, now: float, base_url: str) -> Any:
        store = self.store
        match method, parts:
            case "POST", [""]:
                created = store.create(body, now=now, base_url=base_url)
                recorder.batch_created(created["request_counts"]["processing"])
                return created
            case "GET", [""]:
                return page_of(store.newest_first(base_url=base_url), query)
            case "GET", [batch_id]:
                return store.retrieve(batch_id, base_url=base_url)
            case "GET", [batch_id, "results"]:
                return JsonLines(store.results(batch_id))
            case "POST", [batch_id, "cancel"]:
                return store.cancel(batch_id, now=now, base_url=base_url)
            case "DELETE", [batch_id]:
                return store.delete(batch_id)
        raise RequestInvalid(404, "not_found_error", f"Not found: {method} {_BATCHES}/{'/'.join(parts)}")
