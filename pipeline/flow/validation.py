"""Checks on a work answer before it is returned.

Classify and extract answers are checked deterministically; an extract job's schema is run
confined (pipeline/flow/schema_check.py). Those verdicts, and a refusal, a truncated or an empty
answer of any kind (``quick_verdict``), are reached at the end of the work stage, in the statement
that records the answer. Drafts and free generation are not machine-checkable, so they go on to
the validate stage for a Haiku format check; ``parse_format_check`` reads its answer.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass, field
from typing import Any

from pipeline.flow.schema_check import SchemaUnusable, errors
from pipeline.models import JobKind


@dataclass(frozen=True)
class Verdict:
    ok: bool
    validator: str
    problems: list[str] = field(default_factory=list)
    output: Any = None  # the parsed answer to keep, when ok
    # The fault is the job's, not the answer's (a schema that cannot be checked): no other attempt
    # or tier could pass, so the job fails at once instead of paying for them.
    final: bool = False

    @property
    def feedback(self) -> str:
        return "; ".join(self.problems)


def _strip_fence(text: str) -> str:
    """The answer inside a Markdown code fence (```json ... ```), or the text as it is. Sliced, not
    matched with a regular expression: a backtracking one took quadratic time on an unclosed
    fence followed by a long run of whitespace, and the answer is a model's, steerable by a job."""
    text = text.strip()
    if len(text) < 6 or not (text.startswith("```") and text.endswith("```")):
        return text
    return text[3:-3].lstrip(string.ascii_letters).strip()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise ValueError(f"{text} is beyond a double's range")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _load_json(text: str) -> Any:
    """The answer as JSON, or None. Only what JSON can write: Python's parser also reads NaN,
    Infinity and -Infinity, and a number beyond a double's range as infinity, none of which
    Postgres stores in a job's output (JSONB)."""
    try:
        return json.loads(_strip_fence(text), parse_float=_finite, parse_constant=_no_constant)
    # ValueError besides JSONDecodeError: an integer of more than 4,300 digits, which Python refuses
    # to convert (its guard against quadratic time), and the two refusals above.
    except (ValueError, RecursionError):
        return None


def check_stop(answer: str | None, stop_reason: str | None) -> Verdict | None:
    """A refusal, a truncated or an empty answer fails whatever the kind."""
    if stop_reason == "refusal":
        return Verdict(False, "answer", ["the model refused to answer"])
    if stop_reason == "max_tokens":
        return Verdict(False, "answer", ["the answer was cut off at max_tokens"])
    if answer is None or not answer.strip():
        return Verdict(False, "answer", ["the answer is empty"])
    return None


def check_label(answer: str, labels: list[str]) -> Verdict:
    data = _load_json(answer)
    if isinstance(data, dict) and "label" in data:
        label = data["label"]
    elif isinstance(data, str):
        label = data  # a JSON string holding the label
    elif data is None and "\n" not in answer.strip():
        label = answer.strip()  # a bare label is a fair answer too
    else:
        return Verdict(False, "label", ['answer is not {"label": ...}'])
    if label not in labels:
        return Verdict(False, "label", [f"label {label!r} is not one of {labels}"])
    return Verdict(True, "label", output={"label": label})


def check_schema(answer: str, schema: dict[str, Any]) -> Verdict:
    data = _load_json(answer)
    if data is None:
        return Verdict(False, "json_schema", ["answer is not valid JSON"])
    try:
        found = sorted(errors(schema, data), key=lambda e: list(e.absolute_path))
    except SchemaUnusable as exc:
        return Verdict(False, "json_schema", [f"the schema {exc.reason}"], final=True)
    if found:
        problems = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in found[:5]]
        return Verdict(False, "json_schema", problems)
    return Verdict(True, "json_schema", output=data)


def deterministic_check(kind: JobKind, payload: dict[str, Any], answer: str) -> Verdict | None:
    """The verdict for machine-checkable kinds; None where a format check must decide."""
    if kind is JobKind.CLASSIFY:
        return check_label(answer, payload["labels"])
    if kind is JobKind.EXTRACT:
        return check_schema(answer, payload["schema"])
    return None


def quick_verdict(kind: JobKind, payload: dict[str, Any], answer: str | None,
                  stop_reason: str | None) -> Verdict | None:
    """The verdict that needs no model: a bad stop whatever the kind, else the label or schema
    check; None where only a format check can decide (a draft or a generation that answered)."""
    return check_stop(answer, stop_reason) or deterministic_check(kind, payload, answer or "")


def parse_format_check(text: str | None, answer: str) -> Verdict | None:
    """Read the format checker's answer: its verdict on the draft, or None when the answer is no
    verdict (not JSON, or no boolean "ok"). A draft is never passed on such an answer: the validate
    stage makes the check again once, then fails closed (``format_check_unreadable``)."""
    data = _load_json(text or "")
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        return None
    listed = data.get("problems") or []
    if not isinstance(listed, list):
        listed = [listed if isinstance(listed, str) else json.dumps(listed)]  # one problem, written oddly
    problems = [str(p) for p in listed if str(p).strip()]
    if data["ok"]:
        return Verdict(True, "format_check", output={"text": answer})
    return Verdict(False, "format_check", problems or ["the format check failed without a reason"])


_WHY_UNREADABLE = {"refusal": " (the last time, the model refused)",
                   "max_tokens": " (the last time, it was cut off at max_tokens)"}


def format_check_unreadable(stop_reason: str | None = None) -> Verdict:
    """The verdict when the format check answered twice with no verdict: the draft fails, as it
    would on a failed check (retry with feedback, then escalation), rather than go out unchecked.
    ``stop_reason``: the second answer's, which says why when it is a refusal or a cut."""
    why = _WHY_UNREADABLE.get(stop_reason or "", "")
    return Verdict(False, "format_check", [f"the format check's answer could not be read, twice{why}, so the "
                                           "answer was not accepted unchecked"])
