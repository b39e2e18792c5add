"""The prompts, one per stage and kind.

Each system prompt ends with a ``[switchyard:PURPOSE]`` tag and each user message carries the job
in tagged sections (``<text>``, ``<labels>``, ...). The tags keep the job's own text apart from our
instructions, and they are the contract the bundled fake Claude answers to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.intake.jobspec import FEEDBACK_MAX_CHARS
from pipeline.models import JobKind


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


def _section(name: str, value: str) -> str:
    return f"<{name}>\n{value}\n</{name}>"


def _job_sections(kind: JobKind, payload: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for name in ("text", "instructions", "context", "prompt"):
        if name in payload:
            parts.append(_section(name, payload[name]))
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


def triage_prompt(kind: JobKind, payload: dict[str, Any]) -> Prompt:
    user = "\n".join([_section("kind", kind.value), *_job_sections(kind, payload)])
    return Prompt(TRIAGE_SYSTEM, user)


def work_prompt(kind: JobKind, payload: dict[str, Any], *, feedback: str | None = None) -> Prompt:
    parts = _job_sections(kind, payload)
    if feedback:
        # Cut, so that the enqueue-time size check (pipeline.intake.jobspec.max_job_tokens) can count on it.
        feedback = feedback[:FEEDBACK_MAX_CHARS]
        parts.append(_section("feedback", "Your previous answer was rejected: " + feedback +
                              "\nAnswer again, fixing these problems."))
    return Prompt(_WORK_SYSTEM[kind], "\n".join(parts))


def format_check_prompt(kind: JobKind, payload: dict[str, Any], output: str) -> Prompt:
    parts = [_section("kind", kind.value), *_job_sections(kind, payload), _section("output", output)]
    return Prompt(FORMAT_CHECK_SYSTEM, "\n".join(parts))
