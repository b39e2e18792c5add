"""The fake honours the real API's shapes: validation, errors, headers, usage, endpoints."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime

import anthropic
import pytest

from pipeline.fake_claude import FakeClaude, FakeOptions
from tests.fake_claude.helpers import (
    HAIKU,
    HEADERS,
    OPUS,
    SONNET,
    ask,
    error_message,
    http,
    message_body,
    text_of,
    user_text,
)

REQUEST_ID = re.compile(r"^req_[A-Za-z0-9]{24}$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
LABELS = ["billing", "shipping"]


def _assert_error(status: int, body: dict[str, object], error_type: str, needle: str) -> None:
    assert set(body) == {"type", "error", "request_id"}
    assert body["type"] == "error"
    assert isinstance(body["error"], dict)
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    assert needle in body["error"]["message"]
    assert REQUEST_ID.match(str(body["request_id"]))


def test_success_shape_usage_and_headers(fake: FakeClaude) -> None:
    user = user_text(text="billing issue", labels=LABELS)
    body = message_body(user)
    status, headers, message = http(fake.base_url, "/v1/messages", body)
    assert status == 200
    assert set(message) == {"id", "type", "role", "content", "model", "stop_reason", "stop_sequence", "usage"}
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant", SONNET)
    assert message["stop_sequence"] is None
    text = message["content"][0]["text"]
    expected_input = math.ceil((len(body["system"]) + len(user)) / 4)
    assert message["usage"] == {
        "input_tokens": expected_input,
        "output_tokens": math.ceil(len(text) / 4),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert REQUEST_ID.match(headers["request-id"])
    for kind in ("requests", "input-tokens", "output-tokens"):
        assert int(headers[f"anthropic-ratelimit-{kind}-limit"]) > 0
        assert int(headers[f"anthropic-ratelimit-{kind}-remaining"]) >= 0
        assert RFC3339.match(headers[f"anthropic-ratelimit-{kind}-reset"])
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"system": 5}, "system"),
        ({"stream": True}, "streaming is not supported"),
    ],
)
def test_invalid_bodies_name_the_field(fake: FakeClaude, change: dict[str, object], needle: str) -> None:
    body = message_body("hello")
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    status, headers, error = http(fake.base_url, "/v1/messages", body)
    assert status == 400
    _assert_error(status, error, "invalid_request_error", needle)
    assert headers["request-id"] == error["request_id"]


def test_body_must_be_a_json_object(fake: FakeClaude) -> None:
    for raw in (b"{not json", b"[1, 2]"):
        status, _, error = http(fake.base_url, "/v1/messages", raw)
        assert status == 400
        _assert_error(status, error, "invalid_request_error", "body")


def test_sdk_raises_bad_request(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=SONNET, max_tokens=10, messages=[])
    assert "messages" in error_message(caught.value)


def test_api_key_is_required(fake: FakeClaude) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "x-api-key"}
    status, _, error = http(fake.base_url, "/v1/messages", message_body("hi"), headers=headers)
    assert status == 401
    _assert_error(status, error, "authentication_error", "x-api-key")


def test_bearer_key_from_the_sdk_is_accepted(fake: FakeClaude) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "x-api-key"} | {"authorization": "Bearer k"}
    assert http(fake.base_url, "/v1/messages", message_body("hi"), headers=headers)[0] == 200


def test_configured_api_key_rejects_others() -> None:
    with FakeClaude(options=FakeOptions(api_key="right")) as fc:
        wrong = anthropic.Anthropic(api_key="wrong", base_url=fc.base_url, max_retries=0)
        with wrong, pytest.raises(anthropic.AuthenticationError):
            ask(wrong, "classify", "hi")
        with anthropic.Anthropic(api_key="right", base_url=fc.base_url, max_retries=0) as right:
            assert ask(right, "classify", "hi").content


def test_anthropic_version_is_required(fake: FakeClaude) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "anthropic-version"}
    status, _, error = http(fake.base_url, "/v1/messages", message_body("hi"), headers=headers)
    assert status == 400
    _assert_error(status, error, "invalid_request_error", "anthropic-version")


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        ask(client, "classify", "hi", model="gpt-4o")
    assert error_message(caught.value) == "model: gpt-4o"
    # Any id of the documented shape is served, listed or not.
    assert ask(client, "classify", "hi", model="claude-sonnet-7-1-20270101").model == "claude-sonnet-7-1-20270101"


@pytest.mark.parametrize("param", [{"temperature": 0.2}, {"top_p": 0.9}, {"top_k": 5}])
def test_sampling_params_rejected_by_new_sonnet_and_opus(
    client: anthropic.Anthropic, param: dict[str, float]
) -> None:
    # SDK 2.x no longer takes these as arguments, so they travel in extra_body.
    for model in ("claude-sonnet-5", SONNET, OPUS):
        with pytest.raises(anthropic.BadRequestError) as caught:
            ask(client, "classify", "hi", model=model, extra_body=param)
        assert next(iter(param)) in error_message(caught.value)
    for model in ("claude-sonnet-4-6", "claude-opus-4-6", HAIKU):
        assert ask(client, "classify", "hi", model=model, extra_body=param).content


def test_prompt_too_long(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=HAIKU, max_tokens=10, messages=[{"role": "user", "content": "x" * 800_004}])
    assert error_message(caught.value) == "prompt is too long: 200001 tokens > 200000 maximum"


def test_max_tokens_truncates(client: anthropic.Anthropic) -> None:
    message = ask(client, "draft", user_text(instructions="Write a long letter"), max_tokens=3)
    assert message.stop_reason == "max_tokens"
    assert len(text_of(message)) == 12
    assert message.usage.output_tokens == 3


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    message = ask(client, "classify", user_text(text="billing", labels=LABELS), stop_sequences=['"billing'])
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == '"billing'
    assert text_of(message) == '{"label": '


def test_count_tokens(client: anthropic.Anthropic, fake: FakeClaude) -> None:
    counted = client.messages.count_tokens(
        model=HAIKU, system="abcd", messages=[{"role": "user", "content": "12345678"}]
    )
    assert counted.input_tokens == 3
    status, _, body = http(fake.base_url, "/v1/messages/count_tokens", {"model": HAIKU, "messages": []})
    assert status == 400
    assert "messages" in body["error"]["message"]


def test_models_list(client: anthropic.Anthropic, fake: FakeClaude) -> None:
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert ids == list(fake.options.models)
    assert all(m.type == "model" and m.display_name.startswith("Claude ") for m in page.data)
    status, _, body = http(fake.base_url, "/v1/models?limit=2")
    assert status == 200
    assert body["has_more"] is True
    assert (body["first_id"], body["last_id"]) == (ids[0], ids[1])
    assert all(datetime.fromisoformat(m["created_at"]) for m in body["data"])
    after = http(fake.base_url, f"/v1/models?after_id={ids[1]}&limit=100")[2]
    assert [m["id"] for m in after["data"]] == ids[2:]


def test_one_model_by_id(client: anthropic.Anthropic, fake: FakeClaude) -> None:
    model = client.models.retrieve(SONNET)
    assert (model.id, model.type) == (SONNET, "model") and model.display_name.startswith("Claude ")
    # Any id /v1/messages serves is found, listed or not; any other is not.
    assert client.models.retrieve("claude-opus-7-1-20270101").id == "claude-opus-7-1-20270101"
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert error_message(caught.value) == "model: gpt-4o"
    headers = {k: v for k, v in HEADERS.items() if k != "x-api-key"}
    status, _, error = http(fake.base_url, f"/v1/models/{SONNET}", headers=headers)
    assert status == 401
    _assert_error(status, error, "authentication_error", "x-api-key")


def test_unknown_path_is_not_found(fake: FakeClaude) -> None:
    status, _, body = http(fake.base_url, "/v1/nothing", {"x": 1})
    assert status == 404
    _assert_error(status, body, "not_found_error", "/v1/nothing")


def test_errors_carry_rate_limit_headers(fake: FakeClaude) -> None:
    status, headers, _ = http(fake.base_url, "/v1/messages", message_body("hi", model="nope"))
    assert status == 404
    assert "anthropic-ratelimit-requests-limit" in headers
    assert REQUEST_ID.match(headers["request-id"])


def test_json_answer_bodies_roundtrip_unicode(client: anthropic.Anthropic) -> None:
    labels = ["café", "thé"]
    message = ask(client, "classify", user_text(text="un café, merci", labels=labels))
    assert json.loads(text_of(message)) == {"label": "café"}
