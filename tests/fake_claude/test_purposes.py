"""Each purpose of the prompt contract gets a parseable, valid answer through the real SDK."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import pytest

from tests.fake_claude.helpers import HAIKU, OPUS, ask, text_of, user_text

TICKET = "Hi, I was charged twice on my invoice for March. Please refund the duplicate payment."
LABELS = ["billing", "technical_support", "sales", "other"]

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {
            "customer_name": {"type": "string", "minLength": 3},
            "email": {"type": "string", "format": "email"},
            "amount": {"type": "number", "minimum": 0, "maximum": 500},
            "refund_requested": {"type": "boolean"},
        },
        "required": ["customer_name", "email", "amount", "refund_requested"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "order": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "minLength": 6, "maxLength": 6},
                    "placed_on": {"type": "string", "format": "date"},
                    "status": {"enum": ["pending", "shipped", "delivered"]},
                    "items": {
                        "type": "array",
                        "minItems": 2,
                        "maxItems": 4,
                        "items": {
                            "type": "object",
                            "properties": {
                                "sku": {"type": "string"},
                                "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                            },
                            "required": ["sku", "quantity"],
                            "additionalProperties": False,
                        },
                    },
                },
                "required": ["id", "placed_on", "status", "items"],
            },
            "priority": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4},
            "notes": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3,
                     "uniqueItems": True},
        },
        "required": ["order", "priority", "tags"],
    },
    "refs_and_combinators": {
        "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}},
                             "required": ["name"]}},
        "type": "object",
        "properties": {
            "author": {"$ref": "#/$defs/person"},
            "reviewers": {"type": "array", "items": {"$ref": "#/$defs/person"}},
            "score": {"anyOf": [{"type": "null"}, {"type": "integer", "multipleOf": 5,
                                                    "minimum": 10, "maximum": 30}]},
            "meta": {"allOf": [{"type": "object", "properties": {"v": {"const": 2}}, "required": ["v"]},
                               {"properties": {"w": {"type": "string"}}, "required": ["w"]}]},
            "nothing": {"type": "null"},
        },
        "required": ["author", "reviewers", "score", "meta", "nothing"],
    },
}


def test_triage_answers_a_verdict(client: anthropic.Anthropic) -> None:
    message = ask(client, "triage", user_text(kind="classify", text=TICKET, labels=LABELS), model=HAIKU)
    verdict = json.loads(text_of(message))
    assert set(verdict) == {"difficulty", "confidence", "reason"}
    assert verdict["difficulty"] in ("easy", "medium", "hard")
    assert 0.85 <= verdict["confidence"] <= 0.97
    assert verdict["reason"].endswith(".")
    assert message.stop_reason == "end_turn"
    assert message.model == HAIKU


def test_triage_leans_harder_for_long_jobs(client: anthropic.Anthropic) -> None:
    rank = {"easy": 0, "medium": 1, "hard": 2}

    def mean_rank(words: int) -> float:
        verdicts = [
            json.loads(text_of(ask(client, "triage", user_text(text=f"job {i}: " + "word " * words),
                                   model=HAIKU)))["difficulty"]
            for i in range(12)
        ]
        return sum(rank[v] for v in verdicts) / len(verdicts)

    assert mean_rank(2) < mean_rank(2000)


def test_classify_picks_a_label_mentioned_in_the_text(client: anthropic.Anthropic) -> None:
    message = ask(client, "classify", user_text(text=TICKET + " billing", labels=LABELS))
    assert json.loads(text_of(message)) == {"label": "billing"}


def test_classify_without_a_mention_still_picks_a_label(client: anthropic.Anthropic) -> None:
    for i in range(5):
        message = ask(client, "classify", user_text(text=f"zzz qqq {i}", labels=LABELS))
        assert json.loads(text_of(message))["label"] in LABELS


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_extract_validates_against_the_schema(client: anthropic.Anthropic, name: str) -> None:
    schema = SCHEMAS[name]
    text = "Order from Jane Doe (jane.doe@example.org) on 2026-03-14, total 120.50 EUR."
    for model in (OPUS, HAIKU):
        data = json.loads(text_of(ask(client, "extract", user_text(text=text, schema=schema), model=model)))
        jsonschema.Draft202012Validator(schema).validate(data)


def test_extract_pulls_values_from_the_text(client: anthropic.Anthropic) -> None:
    text = "Order from Jane Doe (jane.doe@example.org) on 2026-03-14."
    data = json.loads(text_of(ask(client, "extract", user_text(text=text, schema=SCHEMAS["flat"]))))
    assert data["customer_name"] == "Jane Doe"
    assert data["email"] == "jane.doe@example.org"


@pytest.mark.parametrize("purpose", ["draft", "generate"])
def test_draft_and_generate_write_prose_about_the_ask(client: anthropic.Anthropic, purpose: str) -> None:
    ask_text = "Write a short apology about the delayed parcel"
    section = {"instructions": ask_text} if purpose == "draft" else {"prompt": ask_text}
    text = text_of(ask(client, purpose, user_text(context="Parcel 42 was late.", **section)))
    assert "delayed parcel" in text
    assert text.count(".") >= 2
    assert "[fake-bad-output]" not in text


@pytest.mark.parametrize(
    ("output", "ok"),
    [("Dear customer, sorry for the delay.", True), ("Dear [fake-bad-output]", False), ("  \n ", False)],
)
def test_format_check(client: anthropic.Anthropic, output: str, ok: bool) -> None:
    user = user_text(kind="draft", instructions="Apologise.", output=output)
    verdict = json.loads(text_of(ask(client, "format_check", user, model=HAIKU)))
    assert verdict["ok"] is ok
    assert (verdict["problems"] == []) is ok


def test_format_check_reads_only_its_own_output_section(client: anthropic.Anthropic) -> None:
    # The answer under check contains tags of its own; they must not confuse the section parser.
    output = "<output>\n\n</output> fine text"
    verdict = json.loads(text_of(ask(client, "format_check", user_text(kind="draft", output=output))))
    assert verdict == {"ok": True, "problems": []}


def test_untagged_system_gets_generic_text(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=HAIKU, max_tokens=100, system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is a queue?"}]}],
    )
    assert text_of(message)
    assert message.usage.output_tokens >= 1


def test_system_as_blocks_carries_the_purpose(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=HAIKU, max_tokens=100,
        system=[{"type": "text", "text": "Classify."}, {"type": "text", "text": "[switchyard:classify]"}],
        messages=[{"role": "user", "content": user_text(text="sales call", labels=LABELS)}],
    )
    assert json.loads(text_of(message)) == {"label": "sales"}


@pytest.mark.parametrize(
    ("routed", "reference", "as_good"),
    [("Dear customer,\nsorry for the delay.", "dear customer, sorry  for the delay.", True),
     ("Sorry.", "Dear customer, sorry for the delay.", False)],
)
def test_judge_says_as_good_only_for_the_same_answer(client: anthropic.Anthropic, routed: str, reference: str,
                                                      as_good: bool) -> None:
    # Through switchyard's own prompt, as shadow evaluation sends it.
    from pipeline.flow.prompts import judge_prompt
    from pipeline.models import JobKind

    prompt = judge_prompt(JobKind.DRAFT, {"instructions": "Apologise."}, routed=routed, reference=reference)
    message = client.messages.create(model=OPUS, max_tokens=300, system=prompt.system,
                                     messages=[{"role": "user", "content": prompt.user}])
    verdict = json.loads(text_of(message))
    assert verdict["as_good"] is as_good and verdict["reason"]
