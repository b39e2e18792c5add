"""The fake's decisions, without I/O: from a request to the response (or fault) to give.

The server owns sockets, sleeping and bookkeeping; this module owns what the API would say, and
the little state that needs (fault RNG, `times=N` counters, rate-limit buckets).
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import jsonschema

from pipeline.fake_claude import answers
from pipeline.fake_claude.cache import NO_CACHE, CachePlan, PromptCache
from pipeline.fake_claude.errors import (
    RequestInvalid,
    error_body,
    invalid,
    new_message_id,
    new_request_id,
)
from pipeline.fake_claude.hints import ErrorHint, Hints, read_hints
from pipeline.fake_claude.models import is_known, model_class, model_entry
from pipeline.fake_claude.options import ERROR_FAULTS, FakeOptions
from pipeline.fake_claude.prompt import (
    Prompt,
    estimate_input_tokens,
    estimate_output_tokens,
    pick,
    read_prompt,
)
from pipeline.fake_claude.quality import Answer, QualityModel
from pipeline.fake_claude.ratelimit import RateLimiter
from pipeline.fake_claude.schema_values import SchemaFaker
from pipeline.fake_claude.truth import Job
from pipeline.fake_claude.validation import (
    check_headers,
    check_message_body,
    check_prompt_size,
    output_schema,
    schema_digest,
)

_MAX_TIMES_KEYS = 100_000  # `times=N` counters kept, oldest forgotten first


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: Any  # JSON-serialisable


@dataclass(frozen=True)
class BatchAnswer:
    """A processed message-batch request: its result object, and what the stats count of it."""

    result: dict[str, Any]  # {"type": "succeeded", "message": ...}, errored, expired or canceled
    model: str | None = None
    usage: dict[str, int] | None = None  # a succeeded message's usage
    purpose: str | None = None
    judged: Answer | None = None


@dataclass(frozen=True)
class Outcome:
    """What to do with one request. `response` None means: drop the connection unanswered."""

    response: Response | None
    delay_s: float
    request_id: str
    model: str | None = None
    purpose: str | None = None
    input_tokens: int = 0  # as usage reports it: the part neither read from nor written to the cache
    output_tokens: int = 0
    fault: str | None = None
    cache: CachePlan = NO_CACHE
    # The quality model's answer that went out (triage, classify, extract), to check against the truth.
    judged: Answer | None = None
    output_format: str | None = None  # schema_digest of the output_config.format schema asked for

    @property
    def status(self) -> int:
        return self.response.status if self.response else 0


class Responder:
    def __init__(self, options: FakeOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._limiter = RateLimiter(options.rpm, options.itpm, options.otpm, window_s=options.rate_window_s)
        self._fault_rng = random.Random(options.seed)
        # Jitter has its own generator so that it never shifts which requests get faults.
        self._jitter_rng = random.Random(options.seed + 1)
        self._times: OrderedDict[tuple[bytes, str], int] = OrderedDict()
        self._cache = PromptCache(options.cache_min_tokens)
        self.quality = QualityModel(options.error_rates, triage_noise=options.triage_noise, seed=options.seed)

    def reset(self) -> None:
        with self._lock:
            self._fault_rng.seed(self.options.seed)
            self._jitter_rng.seed(self.options.seed + 1)
            self._times.clear()
        self._limiter.reset()
        self._cache.reset()

    def settle(self, outcome: Outcome, *, delivered: bool) -> None:
        """Call as the answer goes out (or is dropped): what it wrote to the cache becomes readable."""
        self._cache.settle(outcome.cache, delivered=delivered)

    # -- endpoints -------------------------------------------------------------------------------

    def messages(self, headers: Mapping[str, str], body: Any, *, now: float) -> Outcome:
        """POST /v1/messages. `headers` has lower-case names; `body` is the parsed JSON."""
        request_id = new_request_id()
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        klass = model_class(model) if model else None
        purpose: str | None = None
        try:
            check_headers(headers, self.options.api_key)
            prompt, input_tokens = _read_request(body)
            purpose = prompt.purpose
            check_prompt_size(input_tokens)
        except RequestInvalid as exc:
            return self._error(exc, request_id, klass, now, model=model, purpose=purpose)
        assert model is not None and klass is not None  # checked by check_message_body

        hints = read_hints(prompt.hints)
        random_fault = self._draw_fault()
        cache = self._cache.plan(body, now)
        # Cached reads do not count toward the input-tokens-per-minute limit, as on the API.
        admission = self._limiter.admit(klass, input_tokens - cache.read_tokens, now)
        if not admission.allowed:
            return self._rate_limited(request_id, klass, now, model, purpose, admission.retry_after_s)
        fault = self._hinted_fault(prompt, hints.error, klass) or random_fault
        delay = self._latency(hints)
        schema = output_schema(body)
        meta = {"request_id": request_id, "model": model, "purpose": purpose, "fault": fault,
                "output_format": schema_digest(schema) if schema is not None else None}

        if fault in ERROR_FAULTS:
            injected = _injected(fault)
            outcome = self._error(injected, request_id, klass, now, model=model, purpose=purpose,
                                  retry_after_s=self.options.retry_after_s, fault=fault)
            return _with_delay(outcome, delay)
        if fault == "drop":
            return Outcome(None, delay, **meta)
        if fault == "stall":
            delay += self.options.stall_seconds

        message, judged = self._reply(body, prompt, hints, klass, fault, cache, input_tokens, now)
        usage = message["usage"]
        self._limiter.charge_output(klass, usage["output_tokens"], now)
        response = Response(200, self._headers(request_id, klass, now), message)
        return Outcome(response, delay, input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"],
                       cache=cache, judged=judged, **meta)

    def batch_request(self, params: Any, *, now: float, drawn: str | None) -> BatchAnswer:
        """One request of a message batch, processed (batches.py): the result line's `result`.

        The same checks and answers as POST /v1/messages, so a request gets the same message in a
        batch as synchronously, but outside the synchronous rate limits, fault rate and request log.
        `drawn` is what the batch's error rates made of it (errored, expired, canceled, or None); a
        [fake:batch=...] hint wins over it. A [fake:error=CODE] hint for an HTTP status gives an
        errored result with that error; stall and drop, transport faults, have no batch equivalent."""
        request_id = new_request_id()
        try:
            prompt, input_tokens = _read_request(params)
            check_prompt_size(input_tokens)
        except RequestInvalid as exc:
            named = params.get("model") if isinstance(params, dict) else None
            return BatchAnswer({"type": "errored", "error": error_body(exc.error_type, exc.message, request_id)},
                               model=named if isinstance(named, str) else None)
        model: str = params["model"]
        klass = model_class(model) or ""
        hints = read_hints(prompt.hints)
        ending = self._hinted_fault(prompt, hints.batch, klass, scope="batch") or drawn
        if ending in ("expired", "canceled"):
            return BatchAnswer({"type": ending}, model=model)
        fault = self._hinted_fault(prompt, hints.error, klass)
        if ending == "errored" or fault in ERROR_FAULTS:
            error = _injected(fault) if fault in ERROR_FAULTS else _BATCH_ERRORED
            return BatchAnswer({"type": "errored", "error": error_body(error.error_type, error.message, request_id)},
                               model=model)
        if fault in ("stall", "drop"):
            fault = None
        cache = self._cache.plan(params, now)
        message, judged = self._reply(params, prompt, hints, klass, fault, cache, input_tokens, now)
        # Answered as soon as made: what it wrote is readable by the batch's next request.
        self._cache.settle(cache, delivered=True)
        return BatchAnswer({"type": "succeeded", "message": message}, model=model, usage=message["usage"],
                           purpose=prompt.purpose, judged=judged)

    def _reply(self, body: dict[str, Any], prompt: Prompt, hints: Hints, klass: str, fault: str | None,
               cache: CachePlan, input_tokens: int, now: float) -> tuple[dict[str, Any], Answer | None]:
        """The message answering a checked request, and the quality model's answer judged in it."""
        content, stop_reason, stop_sequence, output_tokens, judged = self._answer(body, prompt, hints, klass,
                                                                                 fault)
        self._cache.begin(cache, now)
        uncached = input_tokens - cache.read_tokens - cache.creation_tokens
        message = {
            "id": new_message_id(),
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": body["model"],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": uncached,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": cache.creation_tokens,
                "cache_read_input_tokens": cache.read_tokens,
            },
        }
        return message, judged if stop_reason in ("end_turn", "stop_sequence") else None

    def count_tokens(self, headers: Mapping[str, str], body: Any, *, now: float) -> Outcome:
        """POST /v1/messages/count_tokens."""
        request_id = new_request_id()
        try:
            check_headers(headers, self.options.api_key)
            check_message_body(body, need_max_tokens=False)
        except RequestInvalid as exc:
            return self._error(exc, request_id, None, now)
        tokens = estimate_input_tokens(body)
        response = Response(200, self._headers(request_id, None, now), {"input_tokens": tokens})
        return Outcome(response, 0.0, request_id, model=body["model"], input_tokens=tokens)

    def list_models(self, headers: Mapping[str, str], query: Mapping[str, str], *, now: float) -> Outcome:
        """GET /v1/models, with the real API's limit / after_id / before_id paging."""
        request_id = new_request_id()
        try:
            check_headers(headers, self.options.api_key)
            body = page_of([model_entry(m, i) for i, m in enumerate(self.options.models)], query)
        except RequestInvalid as exc:
            return self._error(exc, request_id, None, now)
        return Outcome(Response(200, self._headers(request_id, None, now), body), 0.0, request_id)

    def get_model(self, headers: Mapping[str, str], model_id: str, *, now: float) -> Outcome:
        """GET /v1/models/{model_id}: any id that /v1/messages serves is found, listed or not."""
        request_id = new_request_id()
        try:
            check_headers(headers, self.options.api_key)
        except RequestInvalid as exc:
            return self._error(exc, request_id, None, now)
        if not is_known(model_id):
            return self._error(RequestInvalid(404, "not_found_error", f"model: {model_id}"), request_id, None, now)
        ids = list(self.options.models)
        entry = model_entry(model_id, ids.index(model_id) if model_id in ids else len(ids))
        return Outcome(Response(200, self._headers(request_id, None, now), entry), 0.0, request_id)

    def error(self, status: int, error_type: str, message: str, *, now: float) -> Outcome:
        """An error the server detects itself (unreadable JSON, unknown path)."""
        return self._error(RequestInvalid(status, error_type, message), new_request_id(), None, now)

    # -- pieces ----------------------------------------------------------------------------------

    def _draw_fault(self) -> str | None:
        # Always two draws per request, so a seed fixes the fault count whatever gets chosen.
        with self._lock:
            roll = self._fault_rng.random()
            index = self._fault_rng.randrange(len(self.options.faults)) if self.options.faults else 0
        if self.options.fault_rate > 0 and roll < self.options.fault_rate:
            return self.options.faults[index]
        return None

    def _hinted_fault(self, prompt: Prompt, hint: ErrorHint | None, klass: str, *, scope: str = "") -> str | None:
        """The fault `hint` asks for on this request, counting `times=N` per prompt (and scope: a
        [fake:batch=...] hint counts apart from a [fake:error=...] one)."""
        if hint is None or not hint.applies_to(klass):
            return None
        if hint.times is None:
            return hint.fault
        key = (prompt.digest, prompt.purpose + scope)
        with self._lock:
            seen = self._times.get(key, 0)
            self._times[key] = seen + 1
            self._times.move_to_end(key)
            while len(self._times) > _MAX_TIMES_KEYS:
                self._times.popitem(last=False)
        return hint.fault if seen < hint.times else None

    def _latency(self, hints: Hints) -> float:
        if hints.latency_ms is not None:
            return hints.latency_ms / 1000.0  # an explicit per-request latency: no jitter
        jitter, base = 0.0, self.options.latency_ms
        if self.options.latency_jitter_ms > 0:
            with self._lock:
                jitter = self._jitter_rng.uniform(0.0, self.options.latency_jitter_ms)
        if self.options.latency_sigma > 0:
            with self._lock:
                base *= self._jitter_rng.lognormvariate(0.0, self.options.latency_sigma)
        return (base + jitter) / 1000.0

    def _answer(
        self, body: dict[str, Any], prompt: Prompt, hints: Hints, klass: str, fault: str | None
    ) -> tuple[list[dict[str, Any]], str, str | None, int, Answer | None]:
        """(content blocks, stop_reason, stop_sequence, output_tokens, the quality model's answer in
        them if any)."""
        if fault == "refusal":
            text = answers.REFUSAL_TEXT
            return [{"type": "text", "text": text}], "refusal", None, estimate_output_tokens(text), None
        if fault == "empty":
            blocks: list[dict[str, Any]] = (
                [] if pick(prompt.digest, "empty", 2) == 0 else [{"type": "text", "text": ""}]
            )
            return blocks, "end_turn", None, 1, None
        job = Job.from_prompt(prompt)
        text, judged = self._purpose_text(prompt, job, hints, klass)
        schema = output_schema(body)
        if schema is not None:
            text, judged = self._structured(text, judged, schema, prompt, job, klass)
        if fault == "malformed":
            text, judged = answers.malformed(text), None
        if fault == "max_tokens":
            # Cut where the limit would fall in a longer answer: never a whole JSON document.
            text = text[: max(1, len(text) // 2)]
            return [{"type": "text", "text": text}], "max_tokens", None, body["max_tokens"], None
        stop_reason, stop_sequence = "end_turn", None
        for stop in body.get("stop_sequences") or []:
            at = text.find(stop) if stop else -1
            if at >= 0:
                text, stop_reason, stop_sequence = text[:at], "stop_sequence", stop
                break
        limit = body["max_tokens"] * 4
        if len(text) > limit:
            text, stop_reason, stop_sequence = text[:limit], "max_tokens", None
        return ([{"type": "text", "text": text}], stop_reason, stop_sequence, estimate_output_tokens(text),
                judged)

    def _purpose_text(self, prompt: Prompt, job: Job, hints: Hints, klass: str) -> tuple[str, Answer | None]:
        """The answer's text, and the quality model's answer in it (None for an [fake:invalid] one)."""
        invalid = hints.wants_invalid(klass, prompt.section("feedback") is not None)
        if prompt.purpose == "triage":
            judged = self.quality.answer(job, "triage", klass)
            return answers.triage(prompt, hints, judged.value), None if hints.triage_garbage else judged
        if prompt.purpose == "classify":
            judged = self.quality.answer(job, "classify", klass)
            return answers.classify(prompt, invalid, judged.value), None if invalid or not job.labels else judged
        if prompt.purpose == "extract":
            judged = self.quality.answer(job, "extract", klass)
            return answers.extract(prompt, invalid, judged.value), None if invalid else judged
        if prompt.purpose in ("draft", "generate"):
            return answers.write(prompt, invalid), None
        if prompt.purpose == "format_check":
            return answers.format_check(prompt), None
        if prompt.purpose == "judge":
            return answers.judge(prompt), None
        return answers.other(prompt), None

    def _structured(self, text: str, judged: Answer | None, schema: dict[str, Any], prompt: Prompt, job: Job,
                    klass: str) -> tuple[str, Answer | None]:
        """The answer as constrained decoding gives it: the purpose's own answer when it already fits
        the schema, else a value made for the schema (an [fake:invalid] hint gives way here, as the
        decoder would not let a model break the schema; a refusal or a max_tokens stop still can). An
        extraction made for the schema is still right or wrong as the quality model says."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        else:
            if _fits(value, schema):
                return text, judged
        if prompt.purpose == "extract":
            judged = self.quality.answer(job, "extract", klass, schema=schema)
            return json.dumps(judged.value, ensure_ascii=False), judged
        value = SchemaFaker(schema, job.plain_text, job.digest).value()
        return json.dumps(value, ensure_ascii=False), None

    def _headers(self, request_id: str, klass: str | None, now: float) -> dict[str, str]:
        return {"request-id": request_id, **self._limiter.headers(klass, now)}

    def _error(
        self,
        exc: RequestInvalid,
        request_id: str,
        klass: str | None,
        now: float,
        *,
        model: str | None = None,
        purpose: str | None = None,
        retry_after_s: float | None = None,
        fault: str | None = None,
    ) -> Outcome:
        headers = self._headers(request_id, klass, now)
        if exc.status == 429 and retry_after_s is not None:
            headers.update(_retry_after(retry_after_s))
        body = error_body(exc.error_type, exc.message, request_id)
        return Outcome(Response(exc.status, headers, body), 0.0, request_id, model=model,
                       purpose=purpose, fault=fault)

    def _rate_limited(
        self, request_id: str, klass: str, now: float, model: str, purpose: str, wait_s: float
    ) -> Outcome:
        exc = RequestInvalid(
            429, "rate_limit_error",
            f"This request would exceed the rate limit for {klass} models; retry in {math.ceil(wait_s)} s.",
        )
        return self._error(exc, request_id, klass, now, model=model, purpose=purpose,
                           retry_after_s=wait_s)


_FAULT_MESSAGES = {
    "400": "Injected fault: invalid request (fake error=400).",
    "401": "Injected fault: invalid x-api-key (fake error=401).",
    "403": "Injected fault: your API key does not have permission (fake error=403).",
    "404": "Injected fault: not found (fake error=404).",
    "413": "Injected fault: request exceeds the maximum allowed size (fake error=413).",
    "429": "Injected fault: rate limited (fake error=429).",
    "500": "Injected fault: internal server error (fake error=500).",
    "529": "Injected fault: overloaded (fake error=529).",
}


_BATCH_ERRORED = RequestInvalid(500, "api_error", "Injected fault: internal server error (fake batch=errored).")


def page_of(entries: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """A list endpoint's page, as the API pages them: `limit` (1-1000, default 20), `after_id` (the
    entries after that id) or `before_id` (the last `limit` entries before it); RequestInvalid for a
    bad limit."""
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise invalid("limit: Input should be between 1 and 1000")
    ids = [e["id"] for e in entries]
    if query.get("before_id") in ids:
        # Paging backwards: has_more says whether there are more entries before this page.
        end = ids.index(query["before_id"])
        page, has_more = entries[max(0, end - limit):end], end > limit
    else:
        if query.get("after_id") in ids:
            entries = entries[ids.index(query["after_id"]) + 1:]
        page, has_more = entries[:limit], len(entries) > limit
    return {
        "data": page,
        "has_more": has_more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


def _read_request(body: Any) -> tuple[Prompt, int]:
    """A /v1/messages body checked (but for its size): (its prompt, its input tokens)."""
    check_message_body(body, need_max_tokens=True)
    return read_prompt(body), estimate_input_tokens(body)


def _injected(fault: str) -> RequestInvalid:
    status, error_type = ERROR_FAULTS[fault]
    return RequestInvalid(status, error_type, _FAULT_MESSAGES[fault])


def _retry_after(seconds: float) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def _with_delay(outcome: Outcome, delay: float) -> Outcome:
    return replace(outcome, delay_s=delay)


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return bool(validator(schema).is_valid(value))
