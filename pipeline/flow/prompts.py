"""The prompts, one per stage and kind.

Each stage's fixed system prompt ends with a ``[switchyard:PURPOSE]`` tag and each user message carries the job
in tagged sections (``<text>``, ``<labels>``, ...). The tags keep the job's own text apart from our
instructions, and they are the contract the bundled fake Claude answers to.

A job under a task (pipeline.intake.tasks) is laid out for the prompt cache: everything the task's
jobs share goes in the system prompt, after the stage's fixed text (the task's instructions, its
labels with their definitions or its schema, its examples; for triage, what the task is), and the
job's own content in the user message, last. The system prompt is then byte-for-byte the same for
every job of a task version at a stage, so once it reaches the tier's minimum cacheable length it
ends with a ``cache_control`` breakpoint (``Prompt.cache``), written to the cache by the first call
and read by the rest. Jobs without a task keep the prompts they always had.

A prompt whose answer is JSON also carries the JSON Schema of that answer (``Prompt.output_schema``),
which the stage sends as structured outputs where the tier takes them (pipeline.flow.stages): the
label enum for classify, the job's schema for extract (as the decoder takes it:
pipeline.flow.decoder_schema), the verdict for triage and for the format check. It is built from
what the task's jobs share, so it too is the same bytes for every job of a task version: a change of
output format would invalidate the cache. Drafts and generations are free text and carry none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.config import DIFFICULTIES
from pipeline.flow.decoder_schema import for_decoder
from pipeline.intake.jobspec import FEEDBACK_MAX_CHARS, estimate_text_tokens
from pipeline.models import JobKind


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str
    # A cache_control breakpoint at the end of the system prompt (pipeline.claude.client sends the
    # system as a content block then).
    cache: bool = False
    # The JSON Schema the answer follows, for structured outputs; None for free text, or for a
    # job schema the decoder cannot take.
    output_schema: dict[str, Any] | None = None


def _closed_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


# The triage verdict. The decoder does not enforce numeric bounds, so the confidence's range is
# said in its description, and routing.parse_triage still checks it.
TRIAGE_SCHEMA = _closed_object({
    "difficulty": {"type": "string", "enum": list(DIFFICULTIES)},
    "confidence": {"type": "number", "description": "from 0.0 to 1.0"},
    "reason": {"type": "string", "description": "one short sentence"},
})
FORMAT_CHECK_SCHEMA = _closed_object({
    "ok": {"type": "boolean"},
    "problems": {"type": "array", "items": {"type": "string"}},
})


def label_schema(labels: list[str]) -> dict[str, Any]:
    """A classify answer: one of the labels, spelled exactly as given."""
    return _closed_object({"label": {"type": "string", "enum": list(labels)}})


def answer_schema(kind: JobKind, payload: dict[str, Any], *, shared: Shared | None = None) -> dict[str, Any] | None:
    """The schema of a work answer; the task's labels or schema when there is one (the job's copy
    of them was taken from it at enqueue: the same content, and the task's is the same bytes)."""
    if kind is JobKind.CLASSIFY:
        labels = [x["name"] for x in shared.definition["labels"]] if shared is not None else payload["labels"]
        return label_schema(labels)
    if kind is JobKind.EXTRACT:
        return for_decoder(shared.definition["schema"] if shared is not None else payload["schema"])
    return None


@dataclass(frozen=True)
class Shared:
    """A task version's part of the prompts, and the tier's minimum cacheable length (tokens); None
    when caching is off in the configuration, and no prompt gets a breakpoint."""

    definition: dict[str, Any]
    min_cache_tokens: int | None


def _section(name: str, value: str) -> str:
    return f"<{name}>\n{value}\n</{name}>"


def _job_sections(kind: JobKind, payload: dict[str, Any], *, own_only: bool = False) -> list[str]:
    """The job's sections. ``own_only``: its text fields alone (its labels or schema are the task's,
    sent in the shared system prompt)."""
    parts: list[str] = []
    for name in ("text", "instructions", "context", "prompt"):
        if name in payload:
            parts.append(_section(name, payload[name]))
    if own_only:
        return parts
    if kind is JobKind.CLASSIFY:
        parts.append(_section("labels", json.dumps(payload["labels"], ensure_ascii=False)))
    if kind is JobKind.EXTRACT:
        parts.append(_section("schema", json.dumps(payload["schema"], ensure_ascii=False)))
    return parts


TRIAGE_SYSTEM = """You triage jobs for a pipeline that sends easy work to a fast model and hard work \
to a slower, stronger one. Judge how hard the job below is for a capable language model:
- easy: routine, short, one obvious answer;
- medium: needs care or some reasoning, but is well defined;
- hard: long, subtle, ambiguous, or needs deep reasoning or expertise.
Answer with one JSON object and nothing else:
{"difficulty": "easy" | "medium" | "hard", "confidence": <0.0 to 1.0>, "reason": "<one short sentence>"}
[switchyard:triage]"""

_WORK_SYSTEM = {
    JobKind.CLASSIFY: """Classify the text into exactly one of the given labels. Answer with one \
JSON object and nothing else: {"label": "<one of the labels, spelled exactly as given>"}
[switchyard:classify]""",
    JobKind.EXTRACT: """Extract the fields described by the JSON Schema from the text. Answer with \
one JSON object that validates against the schema, and nothing else: no prose, no code fence. \
Use null only where the schema allows it.
[switchyard:extract]""",
    JobKind.DRAFT: """Write the draft the instructions ask for, using the context where given. \
Answer with the draft itself, ready to send: no preamble, no notes to the reader.
[switchyard:draft]""",
    JobKind.GENERATE: """Do what the prompt asks. Answer with the result only.
[switchyard:generate]""",
}

FORMAT_CHECK_SYSTEM = """You check the format of an answer produced by another model, not its \
style. The answer fails if it is empty, truncated, contains notes to the reader or placeholders \
such as [NAME], ignores the instructions' requested form, or is not the kind of text asked for.
Answer with one JSON object and nothing else: {"ok": true | false, "problems": ["<problem>", ...]}
[switchyard:format_check]"""


JUDGE_SYSTEM = """You compare two answers to the same job: the routed answer, from the model the \
job was routed to, and the reference answer, from a stronger model. Judge only whether the routed \
answer does what the instructions ask as well as the reference does; a different wording that is \
as good is as good.
Answer with one JSON object and nothing else:
{"as_good": true | false, "reason": "<one short sentence>"}
[switchyard:judge]"""


def task_sections(kind: JobKind, definition: dict[str, Any], *, triage: bool = False) -> list[str]:
    """What a task's jobs share, as tagged sections: the same bytes for every job of the version."""
    parts = [_section("kind", kind.value)] if triage else []
    parts.append(_section("task_instructions", definition["instructions"].strip()))
    if "labels" in definition:
        parts.append(_section("labels", json.dumps([x["name"] for x in definition["labels"]], ensure_ascii=False)))
        parts.append(_section("label_definitions", "\n".join(f"- {x['name']}: {x['description']}"
                                                             for x in definition["labels"])))
    if "schema" in definition:
        parts.append(_section("schema", json.dumps(definition["schema"], ensure_ascii=False, sort_keys=True)))
    if definition.get("examples"):
        shown = [_section("example", _section("input", e["input"]) + "\n" + _section(
            "expected_output", e["output"] if isinstance(e["output"], str)
            else json.dumps(e["output"], ensure_ascii=False, sort_keys=True))) for e in definition["examples"]]
        parts.append(_section("examples", "\n".join(shown)))
    return parts


def _prompt(system: str, job_parts: list[str], kind: JobKind, shared: Shared | None, *, triage: bool = False,
            tail: list[str] | None = None, output_schema: dict[str, Any] | None = None) -> Prompt:
    if shared is None:
        return Prompt(system, "\n".join(job_parts + (tail or [])), output_schema=output_schema)
    system = "\n".join([system, *task_sections(kind, shared.definition, triage=triage)])
    return Prompt(system, "\n".join(job_parts + (tail or [])),
                  cache=shared.min_cache_tokens is not None and estimate_text_tokens(system) >= shared.min_cache_tokens,
                  output_schema=output_schema)


def triage_prompt(kind: JobKind, payload: dict[str, Any], *, shared: Shared | None = None) -> Prompt:
    if shared is not None:
        return _prompt(TRIAGE_SYSTEM, _job_sections(kind, payload, own_only=True), kind, shared, triage=True,
                       output_schema=TRIAGE_SCHEMA)
    user = "\n".join([_section("kind", kind.value), *_job_sections(kind, payload)])
    return Prompt(TRIAGE_SYSTEM, user, output_schema=TRIAGE_SCHEMA)


def work_prompt(kind: JobKind, payload: dict[str, Any], *, feedback: str | None = None,
                shared: Shared | None = None) -> Prompt:
    parts = _job_sections(kind, payload, own_only=shared is not None)
    tail: list[str] = []
    if feedback:
        # Cut, so that the enqueue-time size check (pipeline.intake.jobspec.max_job_tokens) can count on it.
        feedback = feedback[:FEEDBACK_MAX_CHARS]
        tail.append(_section("feedback", "Your previous answer was rejected: " + feedback +
                             "\nAnswer again, fixing these problems."))
    return _prompt(_WORK_SYSTEM[kind], parts, kind, shared, tail=tail,
                   output_schema=answer_schema(kind, payload, shared=shared))


def format_check_prompt(kind: JobKind, payload: dict[str, Any], output: str, *,
                        shared: Shared | None = None) -> Prompt:
    if shared is not None:
        return _prompt(FORMAT_CHECK_SYSTEM, _job_sections(kind, payload, own_only=True), kind, shared, triage=True,
                       tail=[_section("output", output)], output_schema=FORMAT_CHECK_SCHEMA)
    parts = [_section("kind", kind.value), *_job_sections(kind, payload), _section("output", output)]
    return Prompt(FORMAT_CHECK_SYSTEM, "\n".join(parts), output_schema=FORMAT_CHECK_SCHEMA)


def judge_prompt(kind: JobKind, payload: dict[str, Any], *, routed: str, reference: str,
                 shared: Shared | None = None) -> Prompt:
    """The pairwise question of shadow evaluation (pipeline.flow.shadow): is the routed answer as good
    as the reference for the job's instructions? The two answers come last, in the user message."""
    tail = [_section("routed_answer", routed), _section("reference_answer", reference)]
    if shared is not None:
        return _prompt(JUDGE_SYSTEM, _job_sections(kind, payload, own_only=True), kind, shared, triage=True,
                       tail=tail)
    return Prompt(JUDGE_SYSTEM, "\n".join([_section("kind", kind.value), *_job_sections(kind, payload), *tail]))
