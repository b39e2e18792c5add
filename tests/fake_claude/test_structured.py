"""Structured outputs: output_config.format answers are JSON valid against the schema sent, a bad
schema is a 400, and a refusal or a max_tokens stop still breaks the schema when hinted."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import pytest

from pipeline.fake_claude import FakeClaude, schema_digest
from tests.fake_claude.helpers import HAIKU, SONNET, error_message, system_for, text_of, user_text

LABELS = ["billing", "shipping", "account_access"]
LABEL_SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": LABELS}},
                "required": ["label"], "additionalProperties": False}
EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {"invoice_number": {"type": "string"}, "amount": {"type": "number", "minimum": 0},
                   "currency": {"enum": ["EUR", "USD"]}, "lines": {"type": "array", "items": {
                       "type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}}},
    "required": ["invoice_number", "amount", "currency", "lines"],
    "additionalProperties": False,
}
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"difficulty": {"enum": ["easy", "medium", "hard"]},
                   "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                   "reason": {"type": "string"}},
    "required": ["difficulty", "confidence", "reason"],
    "additionalProperties": False,
}


def _structured(
    client: anthropic.Anthropic, purpose: str, shared: str, job: str, schema: Any, *,
    model: str = SONNET, max_tokens: int = 512,
) -> anthropic.types.Message:
    # The task's shared part (labels, schema) sits in the system prompt, as a task prompt puts it,
    # so the fake cannot lean on a <labels> or <schema> section of the job.
    return client.messages.create(
        model=model, max_tokens=max_tokens,
        system=[{"type": "text", "text": system_for(purpose)}, {"type": "text", "text": shared}],
        messages=[{"role": "user", "content": user_text(text=job)}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )


@pytest.mark.parametrize(
    ("purpose", "schema", "model"),
    [("classify", LABEL_SCHEMA, SONNET), ("extract", EXTRACT_SCHEMA, SONNET), ("triage", VERDICT_SCHEMA, HAIKU)],
)
def test_answers_validate_against_the_schema(
    client: anthropic.Anthropic, purpose: str, schema: Any, model: str,
) -> None:
    for i in range(8):  # answers are hash-chosen: cover several jobs
        message = _structured(client, purpose, f"Task instructions for {purpose}.",
                              f"Invoice INV-{i} for 12.50 EUR, the parcel is late", schema, model=model)
        assert message.stop_reason == "end_turn"
        jsonschema.validate(json.loads(text_of(message)), schema)


def test_invalid_hints_give_way_to_the_schema(client: anthropic.Anthropic) -> None:
    message = _structured(client, "classify", "Sort tickets.", "charged twice [fake:invalid=all]", LABEL_SCHEMA)
    assert json.loads(text_of(message))["label"] in LABELS


@pytest.mark.parametrize(
    ("output_config", "expected"),
    [
        ({"format": {"type": "json_schema", "schema": {"type": "strng"}}},
         "output_config.format.schema: invalid JSON Schema"),
        ({"format": {"type": "json_schema"}}, "output_config.format.schema: Field required"),
        ({"format": {"type": "xml", "schema": {}}}, "output_config.format.type: Input should be 'json_schema'"),
        ({"format": "json"}, "output_config.format: Input should be an object"),
    ],
)
def test_a_bad_output_format_is_a_400(client: anthropic.Anthropic, output_config: Any, expected: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=SONNET, max_tokens=16, messages=[{"role": "user", "content": "x"}],
                               output_config=output_config)
    assert error_message(caught.value).startswith(expected)


def test_a_refusal_hint_breaks_the_schema(client: anthropic.Anthropic) -> None:
    message = _structured(client, "classify", "Sort tickets.", "x [fake:error=refusal]", LABEL_SCHEMA)
    assert message.stop_reason == "refusal"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text_of(message))


def test_a_max_tokens_hint_cuts_the_answer(client: anthropic.Anthropic) -> None:
    message = _structured(client, "extract", "Read invoices.", "INV-9 [fake:error=max_tokens]", EXTRACT_SCHEMA,
                          max_tokens=300)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 300
    with pytest.raises(json.JSONDecodeError):
        json.loads(text_of(message))
    # Only where the hint says: the same job at Haiku answers whole.
    whole = _structured(client, "extract", "Read invoices.", "INV-9 [fake:error=max_tokens@sonnet]",
                        EXTRACT_SCHEMA, model=HAIKU)
    assert whole.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(whole)), EXTRACT_SCHEMA)


def test_structured_outputs_with_a_prefill_is_a_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=SONNET, max_tokens=16,
            messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": '{"label": "'}],
            output_config={"format": {"type": "json_schema", "schema": LABEL_SCHEMA}},
        )
    assert "prefill" in error_message(caught.value)


def test_the_request_log_names_the_schema_asked_for(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    with_schema = client.messages.with_raw_response.create(
        model=SONNET, max_tokens=64, system=system_for("classify"),
        messages=[{"role": "user", "content": user_text(text="charged twice")}],
        output_config={"format": {"type": "json_schema", "schema": LABEL_SCHEMA}})
    without = client.messages.with_raw_response.create(
        model=SONNET, max_tokens=64, system=system_for("classify"),
        messages=[{"role": "user", "content": user_text(text="charged twice", labels=LABELS)}])
    logged = {r["request_id"]: r["output_format"] for r in fake.requests()}
    assert logged[with_schema.headers["request-id"]] == schema_digest(LABEL_SCHEMA)
    assert logged[without.headers["request-id"]] is None
    # The digest follows the order the keys were sent in, as the prompt cache does.
    assert schema_digest(dict(reversed(list(LABEL_SCHEMA.items())))) != schema_digest(LABEL_SCHEMA)
