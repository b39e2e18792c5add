"""Structured outputs: each prompt carries the schema of its answer, the stages send it as
output_config.format only to a tier configured for it (checked on what the fake received over HTTP),
and what the decoder still lets through (a refusal, a cut) is validated and escalated as ever."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import select

from pipeline.fake_claude import FakeClaude, schema_digest
from pipeline.flow.decoder_schema import for_decoder
from pipeline.flow.prompts import (
    FORMAT_CHECK_SCHEMA,
    TRIAGE_SCHEMA,
    Shared,
    format_check_prompt,
    label_schema,
    triage_prompt,
    work_prompt,
)
from pipeline.flow.stages import Pipeline
from pipeline.models import JobKind, JobStatus, ModelCall, RoutingDecision
from tests.conftest import free_form
from tests.unit.test_stages import dispatched, enqueue, job, pipeline, run_to_end  # noqa: F401  (the fixture)

LABELS = ["billing", "bug"]
SCHEMA = {"type": "object", "required": ["name", "amount"],
          "properties": {"name": {"type": "string", "minLength": 1}, "amount": {"type": "number", "minimum": 0},
                         "note": {"type": ["string", "null"]}}}
PAYLOADS: dict[JobKind, dict[str, Any]] = {
    JobKind.CLASSIFY: {"text": "charged twice", "labels": LABELS},
    JobKind.EXTRACT: {"text": "Dana Smith paid 42.50", "schema": SCHEMA},
    JobKind.DRAFT: {"instructions": "Apologise", "context": "Order 7"},
    JobKind.GENERATE: {"prompt": "Two lines on rivers"},
}


# -- the schemas the prompts carry -----------------------------------------------------------------


def test_each_work_prompt_carries_the_schema_of_its_answer() -> None:
    classify = work_prompt(JobKind.CLASSIFY, PAYLOADS[JobKind.CLASSIFY]).output_schema
    assert classify == label_schema(LABELS)
    assert classify is not None and classify["properties"]["label"]["enum"] == LABELS
    assert work_prompt(JobKind.EXTRACT, PAYLOADS[JobKind.EXTRACT]).output_schema == for_decoder(SCHEMA)
    # Drafts and generations are free text.
    assert work_prompt(JobKind.DRAFT, PAYLOADS[JobKind.DRAFT]).output_schema is None
    assert work_prompt(JobKind.GENERATE, PAYLOADS[JobKind.GENERATE]).output_schema is None
    # A retry with feedback asks for the same answer.
    assert work_prompt(JobKind.CLASSIFY, PAYLOADS[JobKind.CLASSIFY], feedback="wrong").output_schema == classify


@pytest.mark.parametrize("kind", list(JobKind))
def test_triage_and_the_format_check_carry_their_verdicts(kind: JobKind) -> None:
    assert triage_prompt(kind, PAYLOADS[kind]).output_schema == TRIAGE_SCHEMA
    assert format_check_prompt(kind, PAYLOADS[kind], "an answer").output_schema == FORMAT_CHECK_SCHEMA


def test_the_verdict_schemas_describe_what_the_parsers_read() -> None:
    jsonschema.validate({"difficulty": "hard", "confidence": 0.7, "reason": "long"}, TRIAGE_SCHEMA)
    jsonschema.validate({"ok": False, "problems": ["a placeholder"]}, FORMAT_CHECK_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"difficulty": "trivial", "confidence": 0.7, "reason": "x"}, TRIAGE_SCHEMA)


def test_a_task_job_asks_for_the_tasks_schema_in_the_same_bytes_for_every_job() -> None:
    definition = {"instructions": "Read receipts.", "schema": SCHEMA}
    shared = Shared(definition, min_cache_tokens=1024)
    # Each job's copy of the schema (taken at enqueue, and stored in a column of its own) may come
    # back with its keys in another order; the task's is what is sent.
    reordered = dict(reversed(list(SCHEMA.items())))
    first = work_prompt(JobKind.EXTRACT, {"text": "Dana paid 1", "schema": SCHEMA}, shared=shared)
    second = work_prompt(JobKind.EXTRACT, {"text": "Sam paid 2", "schema": reordered}, shared=shared)
    assert first.output_schema is not None
    assert json.dumps(first.output_schema) == json.dumps(second.output_schema)
    labels = Shared({"instructions": "Sort.", "labels": [{"name": "b", "description": "B."},
                                                         {"name": "a", "description": "A."}]}, min_cache_tokens=1024)
    assert work_prompt(JobKind.CLASSIFY, {"text": "x", "labels": ["a", "b"]}, shared=labels).output_schema == \
        label_schema(["b", "a"])


# -- a job's schema, as the decoder takes it ------------------------------------------------------------


def test_the_decoder_schema_closes_objects_and_moves_unenforced_bounds_to_the_description() -> None:
    sent = for_decoder(SCHEMA)
    assert sent == {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": '{"minLength": 1}'},
            "amount": {"type": "number", "description": '{"minimum": 0}'},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["name", "amount"],
        "additionalProperties": False,
    }
    # It is looser than the job's schema where the decoder enforces nothing: validation still runs
    # on the original, and catches what the decoder let through.
    jsonschema.validate({"name": "", "amount": -1, "note": None}, sent)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "", "amount": -1, "note": None}, SCHEMA)


def test_the_decoder_schema_keeps_local_definitions_formats_and_literals() -> None:
    schema = {"type": "object", "required": ["due", "who"],
              "properties": {"due": {"type": "string", "format": "date"}, "odd": {"type": "string", "format": "iban"},
                             "who": {"$ref": "#/$defs/person"}, "cur": {"enum": ["EUR", "USD"]},
                             "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
              "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}}}}}
    sent = for_decoder(schema)
    assert sent is not None
    assert sent["properties"]["due"] == {"type": "string", "format": "date"}
    assert sent["properties"]["odd"] == {"type": "string", "description": '{"format": "iban"}'}
    assert sent["properties"]["who"] == {"$ref": "#/$defs/person"}
    assert sent["properties"]["cur"] == {"enum": ["EUR", "USD"]}
    assert sent["properties"]["tags"] == {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                          "description": '{"maxItems": 3}'}
    assert sent["$defs"]["person"]["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema(sent)


def test_a_list_of_types_becomes_a_branch_each_with_its_own_keywords() -> None:
    schema = {"type": "object", "properties": {
        "buyer": {"type": ["object", "null"], "properties": {"name": {"type": "string"}}, "required": ["name"]},
        "qty": {"type": ["integer", "string"], "minimum": 1, "maxLength": 4}}}
    sent = for_decoder(schema)
    assert sent is not None
    assert sent["properties"]["buyer"] == {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
         "additionalProperties": False},
        {"type": "null"}]}
    assert sent["properties"]["qty"] == {"anyOf": [{"type": "integer", "description": '{"minimum": 1}'},
                                                   {"type": "string", "description": '{"maxLength": 4}'}]}


@pytest.mark.parametrize("schema", [
    {"type": "object"},  # an object of any keys: closing it would leave only {}
    {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
    {"type": "object", "properties": {"a": {}}},  # a value of any type
    {"type": "object", "properties": {"a": {"type": "array"}}},  # items of any type
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/node"}},
     "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}},  # recursive
    {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},  # leaves the schema
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]},  # b closed out
    {"type": "object", "patternProperties": {"^x": {"type": "string"}}, "properties": {"a": {"type": "string"}}},
    {"type": "string"},  # the answer is asked for as one object
    {"$dynamicRef": "#meta"},
])
def test_a_schema_the_decoder_cannot_express_goes_without_structured_outputs(schema: dict[str, Any]) -> None:
    assert for_decoder(schema) is None
    assert work_prompt(JobKind.EXTRACT, {"text": "x", "schema": schema}).output_schema is None


# -- what goes over HTTP ---------------------------------------------------------------------------------


def _sent(p: Pipeline, fake: FakeClaude, jid: int) -> list[tuple[str, str | None]]:
    """Each of the job's calls, in order: its stage and the output schema the fake received."""
    with p.sessions() as s:
        calls = s.scalars(select(ModelCall).where(ModelCall.job_id == jid).order_by(ModelCall.id)).all()
    logged = {r["request_id"]: r["output_format"] for r in fake.requests()}
    return [(c.stage, logged[c.request_id]) for c in calls]


def test_classify_extract_and_triage_calls_carry_output_config(pipeline: Pipeline, fake_claude: FakeClaude,  # noqa: F811
                                                               tmp_path: Path) -> None:
    classify, extract = enqueue(pipeline, tmp_path,
                                {"kind": "classify", "text": "charged twice [fake:difficulty=easy]", "labels": LABELS},
                                {"kind": "extract", "text": "Dana Smith paid 42.50 [fake:difficulty=easy]",
                                 "schema": SCHEMA})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id in (classify, extract)])
    assert job(pipeline, classify).status is job(pipeline, extract).status is JobStatus.SUCCEEDED
    triage = schema_digest(TRIAGE_SCHEMA)
    assert _sent(pipeline, fake_claude, classify) == [("triage", triage), ("work", schema_digest(label_schema(LABELS)))]
    # The job's schema as stored (Postgres keeps a JSONB object's keys in an order of its own).
    decoded = for_decoder(job(pipeline, extract).payload["schema"])
    assert decoded is not None
    assert _sent(pipeline, fake_claude, extract) == [("triage", triage), ("work", schema_digest(decoded))]


def test_a_draft_goes_as_free_text_and_its_format_check_as_a_verdict(pipeline: Pipeline,  # noqa: F811
                                                                     fake_claude: FakeClaude, tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "draft", "instructions": "Apologise for order 7", "tier": "sonnet"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    assert job(pipeline, jid).status is JobStatus.SUCCEEDED
    assert _sent(pipeline, fake_claude, jid) == [("work", None), ("format_check", schema_digest(FORMAT_CHECK_SCHEMA))]


def test_a_tier_without_structured_outputs_is_sent_none(pipeline: Pipeline, fake_claude: FakeClaude,  # noqa: F811
                                                        tmp_path: Path) -> None:
    # Sonnet without them, Haiku (triage) with them: the flag is the called tier's.
    tiers = {**pipeline.models.tiers, "sonnet": replace(pipeline.models.tier("sonnet"), structured_outputs=False)}
    p = replace(pipeline, models=replace(pipeline.models, tiers=tiers))
    [jid] = enqueue(p, tmp_path, {"kind": "classify", "text": "charged twice [fake:difficulty=easy]", "labels": LABELS})
    run_to_end(p, [h for h in dispatched(p) if h.job_id == jid])
    assert job(p, jid).status is JobStatus.SUCCEEDED
    assert _sent(p, fake_claude, jid) == [("triage", schema_digest(TRIAGE_SCHEMA)), ("work", None)]
    # And with every tier off, nothing at all.
    off = replace(pipeline, models=free_form(pipeline.models))
    [jid] = enqueue(off, tmp_path, {"kind": "extract", "text": "Dana paid 3 [fake:difficulty=easy]", "schema": SCHEMA})
    run_to_end(off, [h for h in dispatched(off) if h.job_id == jid])
    assert job(off, jid).status is JobStatus.SUCCEEDED
    assert _sent(off, fake_claude, jid) == [("triage", None), ("work", None)]


@pytest.mark.parametrize(("hint", "reason"), [
    ("[fake:error=refusal@haiku]", "the model refused to triage the job"),
    ("[fake:error=max_tokens@haiku]", "the triage answer was cut off at max_tokens"),
])
def test_a_triage_the_decoder_could_not_hold_is_ambiguous_and_says_why(pipeline: Pipeline, tmp_path: Path,  # noqa: F811
                                                                       hint: str, reason: str) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "classify", "text": f"charged twice {hint}", "labels": LABELS})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert (done.status, done.difficulty) == (JobStatus.SUCCEEDED, "ambiguous")
    with pipeline.sessions() as s:
        decision = s.scalars(select(RoutingDecision).where(RoutingDecision.job_id == jid)).first()
    assert decision is not None
    assert (decision.verdict, decision.to_tier, decision.reason) == ("ambiguous", pipeline.models.routing.ambiguous,
                                                                     reason)


def test_a_refusal_under_structured_outputs_escalates_to_the_end(pipeline: Pipeline, fake_claude: FakeClaude,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """Refused at every work tier: each answer is validated, fails with the reason, is retried and
    escalated, and the job fails saying the model refused (not that the answer was not JSON)."""
    [jid] = enqueue(pipeline, tmp_path, {"kind": "extract", "text": "Dana paid 3 [fake:difficulty=easy] "
                                         "[fake:error=refusal@sonnet,opus]", "schema": SCHEMA})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert done.status is JobStatus.FAILED
    assert done.error == "validation failed at opus after 2 attempt(s): the model refused to answer"
    assert done.escalations == 1
    decoded = for_decoder(done.payload["schema"])
    assert decoded is not None
    assert [s for s in _sent(pipeline, fake_claude, jid) if s[0] == "work"] == [("work", schema_digest(decoded))] * 4


def test_a_format_check_that_refuses_twice_fails_the_draft_and_says_so(pipeline: Pipeline,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    [jid] = enqueue(pipeline, tmp_path, {"kind": "draft", "tier": "opus",
                                         "instructions": "Apologise [fake:error=refusal@haiku]"})
    run_to_end(pipeline, [h for h in dispatched(pipeline) if h.job_id == jid])
    done = job(pipeline, jid)
    assert done.status is JobStatus.FAILED
    assert "the format check's answer could not be read, twice (the last time, the model refused)" in (done.error or "")


def test_a_schema_that_would_double_at_each_level_is_stopped_by_the_budget() -> None:
    """anyOf beside other keywords becomes branches each carrying those keywords: nested, that
    doubles at each level. A tenant's schema must not hold a worker that way: past MAX_NODES
    subschemas it goes without structured outputs (here in well under a second, against hours)."""
    inner: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        inner = {"type": "object", "properties": {"x": inner}, "anyOf": [{"required": ["x"]}, {"required": ["x"]}]}
    assert for_decoder({"type": "object", "properties": {"a": inner}}) is None
