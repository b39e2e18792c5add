"""The truth about a job: its true answer and its true difficulty, for the fake's quality model.

Both derive from the job alone (its text fields with their [fake:...] hints, its labels, its schema),
never from the prompt around it, so that a triage call, a work call, a retry with feedback and a call
on another model all see the same job, and a test or a benchmark can compute the truth in-process from
the job's payload, without the server:

    truth({"text": "...", "labels": [...]}, "classify")        -> "billing"
    truth({"text": "...", "schema": {...}}, "extract")          -> {"name": "Jane Doe", ...}
    truth({"text": "..."}, "triage")                            -> "hard" (its true difficulty)
    is_correct('{"label": "sales"}', job, "classify")           -> False

A job under a task has its labels or schema in the task: pass them with `labels=` / `schema=`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.fake_claude.hints import Hints, read_hints
from pipeline.fake_claude.prompt import Prompt, parse_hints, pick, strip_hints, unit
from pipeline.fake_claude.schema_values import SchemaFaker

# The job's own text, in the order switchyard's prompts give it.
TEXT_FIELDS: tuple[str, ...] = ("text", "instructions", "context", "prompt")
# The kinds with an answer that can be right or wrong; triage's truth is the job's difficulty.
JUDGED_KINDS: tuple[str, ...] = ("classify", "extract")


@dataclass(frozen=True)
class Job:
    text: str                 # the text fields, whitespace collapsed, hints kept
    labels: tuple[str, ...]
    schema: Any               # the extraction schema, None when the job has none
    hints: Hints
    digest: bytes             # sha256 of `text`: every choice about the job derives from it

    @property
    def plain_text(self) -> str:
        """The text without hints: what the job says."""
        return " ".join(strip_hints(self.text).split())

    @classmethod
    def of(cls, job: Mapping[str, Any] | str, *, labels: Sequence[str] | None = None,
           schema: Any = None) -> Job:
        """From a job's payload (or its bare text); `labels` and `schema` default to the payload's."""
        if isinstance(job, str):
            payload: Mapping[str, Any] = {"text": job}
        else:
            payload = job
        parts = [str(payload[name]) for name in TEXT_FIELDS if isinstance(payload.get(name), str)]
        if labels is None:
            raw = payload.get("labels")
            labels = [x for x in raw if isinstance(x, str)] if isinstance(raw, list) else []
        if schema is None:
            schema = payload.get("schema")
        return _job("\n".join(parts), labels, schema)

    @classmethod
    def from_prompt(cls, prompt: Prompt) -> Job:
        """The job a switchyard prompt carries (a task's labels and schema sit in its system prompt)."""
        parts = [prompt.sections[n] for n in TEXT_FIELDS if n in prompt.sections]
        labels = prompt.json_section("labels")
        labels = [x for x in labels if isinstance(x, str)] if isinstance(labels, list) else []
        return _job("\n".join(parts) if parts else prompt.last_user, labels, prompt.json_section("schema"))


def _job(text: str, labels: Sequence[str], schema: Any) -> Job:
    # Collapsed whitespace: the prompt's sections lose the payload's leading and trailing newlines.
    text = " ".join(text.split())
    return Job(text=text, labels=tuple(labels), schema=schema, hints=read_hints(parse_hints(text)),
               digest=hashlib.sha256(text.encode()).digest())


def true_difficulty(job: Job) -> str:
    """A [fake:difficulty=...] hint, else a score: longer and more structured jobs lean harder, and
    the digest spreads jobs of equal size."""
    if job.hints.difficulty is not None:
        return job.hints.difficulty
    size_score = min(1.0, math.log10(1 + len(job.plain_text)) / 4)
    structure = min(0.2, 0.02 * (len(job.labels) + len(schema_keys(job.schema))))
    score = 0.5 * unit(job.digest, "difficulty") + 0.5 * size_score + structure
    return "easy" if score < 0.45 else "medium" if score < 0.7 else "hard"


def true_label(job: Job) -> str | None:
    """A [fake:truth=LABEL] hint naming a label, else a label named in the text, else any label, by
    the digest; None without labels."""
    if not job.labels:
        return None
    hinted = _hinted_label(job)
    if hinted is not None:
        return hinted
    words = set(re.findall(r"[a-z0-9]+", job.plain_text.lower()))
    scores = [len(set(re.findall(r"[a-z0-9]+", label.lower())) & words) for label in job.labels]
    best = max(scores)
    candidates = [label for label, score in zip(job.labels, scores, strict=True) if score == best] if best \
        else list(job.labels)
    return candidates[pick(job.digest, "label", len(candidates))]


def true_value(job: Job, schema: Any = None) -> Any:
    """The fields the text holds, as the fake extracts them: valid against `schema` (default: the job's)."""
    schema = job.schema if schema is None else schema
    return SchemaFaker(schema if isinstance(schema, dict) else {"type": "object"}, job.plain_text,
                       job.digest).value()


def truth(job: Mapping[str, Any] | str | Job, kind: str, *, labels: Sequence[str] | None = None,
          schema: Any = None) -> Any:
    """The true answer to a job of `kind`: a label (classify), a JSON value (extract), or for "triage"
    the job's true difficulty. `job` is a payload, its text, or a Job."""
    view = job if isinstance(job, Job) else Job.of(job, labels=labels, schema=schema)
    if kind == "classify":
        return true_label(view)
    if kind == "extract":
        return true_value(view)
    if kind == "triage":
        return true_difficulty(view)
    raise ValueError(f"no truth for kind {kind!r}: expected classify, extract or triage")


def is_correct(answer: Any, job: Mapping[str, Any] | str | Job, kind: str, *,
               labels: Sequence[str] | None = None, schema: Any = None) -> bool:
    """Whether `answer` is the true one. It may be the answer's text (as the API gave it) or its value:
    for classify a label or {"label": ...}, for extract the JSON value, for triage a difficulty or a
    verdict {"difficulty": ...}."""
    expected = truth(job, kind, labels=labels, schema=schema)
    value = answer
    if isinstance(answer, str):
        try:
            value = json.loads(answer)
        except json.JSONDecodeError:
            value = answer  # a bare label or difficulty
    if kind in ("classify", "triage") and isinstance(value, dict):
        value = value.get("label" if kind == "classify" else "difficulty")
    return bool(value == expected)


def schema_keys(schema: Any) -> list[str]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    return list(props) if isinstance(props, dict) else []


def _hinted_label(job: Job) -> str | None:
    hint = job.hints.truth
    if hint is None:
        return None
    if hint in job.labels:
        return hint
    # A hint value has no spaces: technical_support names "Technical support" too.
    loose = {_loose(label): label for label in job.labels}
    return loose.get(_loose(hint))


def _loose(label: str) -> str:
    return re.sub(r"[\s_-]+", "_", label.strip().lower())


