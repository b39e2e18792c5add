"""[fake:...] hints steer verdicts, validity and faults."""

from __future__ import annotations

import json
import time

import anthropic
import jsonschema
import pytest

from pipeline.fake_claude import FakeClaude, FakeOptions
from tests.fake_claude.helpers import HAIKU, OPUS, SONNET, ask, text_of, user_text

LABELS = ["billing", "shipping"]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_difficulty_and_confidence_hints(client: anthropic.Anthropic) -> None:
    user = user_text(text="Short job [fake:difficulty=hard] [fake:confidence=0.3]")
    verdict = json.loads(text_of(ask(client, "triage", user, model=HAIKU)))
    assert verdict["difficulty"] == "hard"
    assert verdict["confidence"] == 0.3


def test_triage_garbage_is_not_json(client: anthropic.Anthropic) -> None:
    text = text_of(ask(client, "triage", user_text(text="x [fake:triage=garbage]"), model=HAIKU))
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_unknown_and_malformed_hints_are_ignored(client: anthropic.Anthropic) -> None:
    user = user_text(text="billing [fake:whatever=1] [fake:error=999] [fake:difficulty=extreme]",
                     labels=LABELS)
    assert json.loads(text_of(ask(client, "classify", user))) == {"label": "billing"}


@pytest.mark.parametrize(
    ("hint", "invalid_for"),
    [("invalid=sonnet", {SONNET}), ("invalid=opus", {OPUS}), ("invalid=sonnet,opus", {SONNET, OPUS}),
     ("invalid=all", {SONNET, OPUS, HAIKU})],
)
def test_invalid_by_model_class(client: anthropic.Anthropic, hint: str, invalid_for: set[str]) -> None:
    for model in (HAIKU, SONNET, OPUS):
        label = json.loads(text_of(ask(client, "classify", user_text(text=f"[fake:{hint}]", labels=LABELS),
                                       model=model)))["label"]
        assert (label not in LABELS) is (model in invalid_for), model


def test_invalid_extract_breaks_the_schema(client: anthropic.Anthropic) -> None:
    for i in range(6):  # the kind of breakage is hash-chosen: cover several contents
        text = text_of(ask(client, "extract", user_text(text=f"In Oslo {i} [fake:invalid=sonnet]",
                                                        schema=SCHEMA)))
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            continue
        assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(data)


def test_invalid_draft_carries_the_marker(client: anthropic.Anthropic) -> None:
    text = text_of(ask(client, "draft", user_text(instructions="Say hi [fake:invalid=opus]"), model=OPUS))
    assert "[fake-bad-output]" in text


def test_invalid_once_is_fixed_by_feedback(client: anthropic.Anthropic) -> None:
    first = user_text(text="billing [fake:invalid_once]", labels=LABELS)
    retry = user_text(text="billing [fake:invalid_once]", labels=LABELS, feedback="label was wrong")
    assert json.loads(text_of(ask(client, "classify", first)))["label"] not in LABELS
    assert json.loads(text_of(ask(client, "classify", retry)))["label"] == "billing"


@pytest.mark.parametrize(
    ("code", "exc_type", "error_type"),
    [
        ("400", anthropic.BadRequestError, "invalid_request_error"),
        ("401", anthropic.AuthenticationError, "authentication_error"),
        ("403", anthropic.PermissionDeniedError, "permission_error"),
        ("404", anthropic.NotFoundError, "not_found_error"),
        ("413", anthropic.APIStatusError, "request_too_large"),
        ("429", anthropic.RateLimitError, "rate_limit_error"),
        ("500", anthropic.InternalServerError, "api_error"),
        ("529", anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_error_hint_raises_the_sdk_exception(
    client: anthropic.Anthropic, code: str, exc_type: type[anthropic.APIStatusError], error_type: str
) -> None:
    with pytest.raises(exc_type) as caught:
        ask(client, "classify", user_text(text=f"x [fake:error={code}]", labels=LABELS))
    err = caught.value
    assert err.status_code == int(code)
    assert isinstance(err.body, dict)
    assert err.body["error"]["type"] == error_type
    assert err.body["request_id"] == err.response.headers["request-id"]
    if code == "429":
        assert int(err.response.headers["retry-after"]) >= 1
        assert err.response.headers["retry-after-ms"] == "1000"


def test_error_hint_limited_to_a_model_class(client: anthropic.Anthropic) -> None:
    user = user_text(text="billing [fake:error=529@sonnet]", labels=LABELS)
    with pytest.raises(anthropic.OverloadedError):
        ask(client, "classify", user, model=SONNET)
    assert json.loads(text_of(ask(client, "classify", user, model=OPUS))) == {"label": "billing"}


def test_times_limits_the_error_to_the_first_n_requests(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    user = user_text(text="billing [fake:error=500] [fake:times=2]", labels=LABELS)
    for _ in range(2):
        with pytest.raises(anthropic.InternalServerError):
            ask(client, "classify", user)
    assert json.loads(text_of(ask(client, "classify", user))) == {"label": "billing"}
    # Counted per content and purpose: the same text for another purpose starts afresh.
    with pytest.raises(anthropic.InternalServerError):
        ask(client, "triage", user, model=HAIKU)


def test_times_counts_only_matching_model_classes(client: anthropic.Anthropic) -> None:
    user = user_text(text="billing [fake:error=429@opus] [fake:times=1]", labels=LABELS)
    ask(client, "classify", user, model=SONNET)  # does not match, does not count
    with pytest.raises(anthropic.RateLimitError):
        ask(client, "classify", user, model=OPUS)
    ask(client, "classify", user, model=OPUS)


def test_sdk_retries_through_a_transient_529(fake: FakeClaude) -> None:
    retrying = anthropic.Anthropic(api_key="t", base_url=fake.base_url, max_retries=2)
    user = user_text(text="billing [fake:error=529] [fake:times=1] [fake:latency_ms=0]", labels=LABELS)
    with retrying:
        assert json.loads(text_of(ask(retrying, "classify", user))) == {"label": "billing"}


def test_empty_malformed_and_refusal(client: anthropic.Anthropic) -> None:
    empty = ask(client, "classify", user_text(text="x [fake:error=empty]", labels=LABELS))
    assert text_of(empty) == ""
    assert empty.usage.output_tokens >= 1

    malformed = ask(client, "extract", user_text(text="x [fake:error=malformed]", schema=SCHEMA))
    assert malformed.stop_reason == "end_turn"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text_of(malformed))

    refusal = ask(client, "draft", user_text(instructions="x [fake:error=refusal]"))
    assert refusal.stop_reason == "refusal"
    assert text_of(refusal)


def test_drop_closes_the_connection(client: anthropic.Anthropic, fake: FakeClaude) -> None:
    with pytest.raises(anthropic.APIConnectionError) as caught:
        ask(client, "classify", user_text(text="x [fake:error=drop]", labels=LABELS))
    assert not isinstance(caught.value, anthropic.APITimeoutError)
    assert fake.requests()[-1]["status"] == 0
    # The client recovers on a fresh connection.
    assert ask(client, "classify", user_text(text="billing", labels=LABELS))


def test_stall_hits_the_client_timeout() -> None:
    with FakeClaude(options=FakeOptions(stall_seconds=2.0)) as fc:
        impatient = anthropic.Anthropic(api_key="t", base_url=fc.base_url, max_retries=0, timeout=0.5)
        started = time.monotonic()
        with impatient, pytest.raises(anthropic.APITimeoutError):
            ask(impatient, "classify", user_text(text="x [fake:error=stall]", labels=LABELS))
        assert time.monotonic() - started < 1.5


def test_latency_hint_delays_the_answer(client: anthropic.Anthropic) -> None:
    started = time.monotonic()
    ask(client, "classify", user_text(text="x [fake:latency_ms=300]", labels=LABELS))
    assert time.monotonic() - started >= 0.3
