"""The pure parts, without HTTP: prompt parsing, hints, schema values, rate-limit buckets."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.fake_claude.hints import ErrorHint, read_hints
from pipeline.fake_claude.options import FakeOptions
from pipeline.fake_claude.prompt import parse_hints, parse_sections, read_prompt
from pipeline.fake_claude.ratelimit import RateLimiter
from pipeline.fake_claude.responder import Responder
from pipeline.fake_claude.schema_values import SchemaFaker, break_value

HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


def test_sections_are_top_level_only() -> None:
    text = "<text>\nhello\n</text>\n<output>\n<text>inner</text> <output>x</output>\n</output>\n<kind>draft</kind>"
    assert parse_sections(text) == {
        "text": "hello",
        "output": "<text>inner</text> <output>x</output>",
        "kind": "draft",
    }


def test_unclosed_section_is_ignored() -> None:
    assert parse_sections("<text>never closed") == {}


def test_hint_grammar() -> None:
    raw = parse_hints("a [fake:error=529@sonnet,opus] b [fake:times=3] [fake:invalid_once] [fake:latency_ms=12.5]")
    assert raw == {"error": "529@sonnet,opus", "times": "3", "invalid_once": "", "latency_ms": "12.5"}
    hints = read_hints(raw)
    assert hints.error == ErrorHint("529", frozenset({"sonnet", "opus"}), 3)
    assert hints.invalid_once
    assert hints.latency_ms == 12.5
    assert read_hints(parse_hints("[fake:error=529@mistral]")).error is None
    assert read_hints(parse_hints("[fake:confidence=7]")).confidence == 1.0
    assert read_hints(parse_hints("[fake:invalid=all]")).invalid_classes == {"haiku", "sonnet", "opus"}


def test_purpose_from_system_blocks() -> None:
    body = {"system": [{"type": "text", "text": "a"}, {"type": "text", "text": "[switchyard:extract]"}],
            "messages": [{"role": "user", "content": "<text>x</text>"},
                         {"role": "assistant", "content": "ok"}]}
    prompt = read_prompt(body)
    assert prompt.purpose == "extract"
    assert prompt.sections == {"text": "x"}
    assert read_prompt({"system": "[switchyard:nonsense]", "messages": []}).purpose == "other"


SCHEMAS: list[dict[str, Any]] = [
    {"$schema": "http://json-schema.org/draft-07/schema#",
     "type": "array", "items": [{"type": "string"}, {"type": "integer"}], "minItems": 2},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 3},
    {"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
    {"type": "object", "properties": {"d": {"type": "string", "format": "date-time"},
                                      "u": {"type": "string", "format": "uuid"},
                                      "w": {"type": "string", "format": "uri"}}},
    {"type": "number", "multipleOf": 0.25, "minimum": 1, "maximum": 2},
    {"type": "integer", "minimum": 1000},
    {"type": "integer", "maximum": -5},
    {"type": "string", "minLength": 40, "maxLength": 40},
    {"oneOf": [{"type": "null"}, {"type": "object", "properties": {"k": {"type": "boolean"}},
                                  "required": ["k"]}]},
    {"definitions": {"n": {"type": "integer", "minimum": 3, "maximum": 3}}, "$ref": "#/definitions/n"},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2, "uniqueItems": True},
    {"enum": ["red", "green"]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_values_validate(schema: dict[str, Any]) -> None:
    for seed in range(8):
        value = SchemaFaker(schema, "A green thing on 2026-01-02", bytes([seed]) * 32).value()
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator(schema).validate(value)


@settings(max_examples=60, deadline=None)
@given(low=st.integers(-10_000, 10_000), span=st.integers(0, 500), exclusive=st.booleans())
def test_integer_bounds(low: int, span: int, exclusive: bool) -> None:
    schema: dict[str, Any] = {"type": "integer"}
    if exclusive:
        schema |= {"exclusiveMinimum": low - 1, "exclusiveMaximum": low + span + 1}
    else:
        schema |= {"minimum": low, "maximum": low + span}
    value = SchemaFaker(schema, "", b"x" * 32).value()
    assert low <= value <= low + span


@pytest.mark.parametrize(
    "schema",
    [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
     {"type": "object", "properties": {"a": {"type": "string"}}},
     {"type": "integer"}],
)
def test_break_value_fails_the_schema(schema: dict[str, Any]) -> None:
    good = SchemaFaker(schema, "", b"y" * 32).value()
    bad = break_value(schema, good)
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)


def test_rate_limiter_refills_over_time() -> None:
    limiter = RateLimiter(rpm=60, itpm=None, otpm=100)
    assert all(limiter.admit("haiku", 10, now=0.0).allowed for _ in range(60))
    denied = limiter.admit("haiku", 10, now=0.0)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(1.0)
    assert limiter.admit("haiku", 10, now=1.0).allowed
    limiter.charge_output("sonnet", 150, now=1.0)  # output debt blocks until refilled past zero
    wait = limiter.admit("sonnet", 1, now=1.0).retry_after_s
    assert wait == pytest.approx(51 * 60 / 100)
    assert limiter.headers("sonnet", now=1.0)["anthropic-ratelimit-output-tokens-remaining"] == "0"


def test_responder_is_pure_and_deterministic() -> None:
    responder = Responder(FakeOptions())
    body = {"model": "claude-haiku-4-5", "max_tokens": 50, "system": "[switchyard:triage]",
            "messages": [{"role": "user", "content": "<text>a job</text>"}]}
    first = responder.messages(HEADERS, body, now=100.0)
    second = responder.messages(HEADERS, body, now=100.0)
    assert first.response is not None and second.response is not None
    assert first.response.body["content"] == second.response.body["content"]
    assert first.request_id != second.request_id
    dropped = responder.messages(HEADERS, {**body, "messages": [
        {"role": "user", "content": "[fake:error=drop] [fake:latency_ms=50]"}]}, now=100.0)
    assert dropped.response is None and dropped.delay_s == pytest.approx(0.05)
    stalled = Responder(FakeOptions(stall_seconds=3)).messages(
        HEADERS, {**body, "messages": [{"role": "user", "content": "[fake:error=stall]"}]}, now=0.0)
    assert stalled.delay_s == pytest.approx(3.0) and stalled.status == 200


def test_rate_limiter_window_shortens_the_period() -> None:
    limiter = RateLimiter(rpm=10, itpm=None, otpm=None, window_s=10.0)
    assert all(limiter.admit("opus", 1, now=0.0).allowed for _ in range(10))
    denied = limiter.admit("opus", 1, now=0.0)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(1.0)  # 10 a window of 10 s


def test_log_normal_latency_has_the_median_and_p99_asked_for() -> None:
    sigma = 0.692  # exp(2.326 * sigma) = 5: the p99 five times the median
    responder = Responder(FakeOptions(latency_ms=1000, latency_sigma=sigma, seed=3))
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    delays = sorted(responder.messages(HEADERS, body, now=0.0).delay_s for _ in range(4000))
    assert delays[len(delays) // 2] == pytest.approx(1.0, rel=0.08)
    assert delays[int(len(delays) * 0.99)] == pytest.approx(5.0, rel=0.2)
    with pytest.raises(ValueError, match="latency_sigma"):
        FakeOptions(latency_sigma=-1)
