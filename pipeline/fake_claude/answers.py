"""What the fake says, by purpose. The answer itself (a verdict's difficulty, a label, the extracted
value) is the quality model's (quality.py); the wording around it derives from the prompt digest, so
the same request always gets the same answer."""

from __future__ import annotations

import json
from typing import Any

from pipeline.fake_claude.hints import Hints
from pipeline.fake_claude.prompt import Prompt, pick, strip_hints, unit
from pipeline.fake_claude.schema_values import break_value

BAD_OUTPUT_MARKER = "[fake-bad-output]"
REFUSAL_TEXT = "I'm sorry, but I can't help with that request."

_REASONS = {
    "easy": ("Short, self-contained request with one obvious answer.",
             "Routine job with clear instructions and little ambiguity."),
    "medium": ("Well-defined job that still needs some care and reasoning.",
               "Moderate length; a few details need attention."),
    "hard": ("Long or subtle input that needs careful reasoning.",
             "Ambiguous job that needs expertise and deep reasoning."),
}
_OTHER = (
    "Sure. Here is a short answer: it depends on the details, but the usual approach works well.",
    "Happy to help. In brief: start with the simplest option and refine it from there.",
    "Here is my take: the request is clear, and a concise answer should cover it.",
)


def job_text(prompt: Prompt) -> str:
    """The job's own content (what triage judges and extraction reads), without the hints."""
    names = ("text", "instructions", "context", "prompt")
    parts = [prompt.sections[n] for n in names if n in prompt.sections]
    return strip_hints("\n".join(parts) if parts else prompt.last_user).strip()


def triage(prompt: Prompt, hints: Hints, difficulty: str) -> str:
    """A verdict of `difficulty` (the quality model's: the job's true one, or noise)."""
    if hints.triage_garbage:
        return "Hmm, this one looks fairly doable to me, though it is hard to say for sure."
    confidence = hints.confidence
    if confidence is None:
        confidence = round(0.85 + 0.12 * unit(prompt.digest, "confidence"), 2)
    reason = _REASONS[difficulty][pick(prompt.digest, "reason", 2)]
    return json.dumps({"difficulty": difficulty, "confidence": confidence, "reason": reason})


def classify(prompt: Prompt, invalid: bool, label: str | None) -> str:
    """{"label": label}, the quality model's (None: the job has no labels to choose from)."""
    labels = _labels(prompt)
    if invalid or label is None:
        wrong = "none_of_the_above"
        while wrong in labels:
            wrong += "_"
        return json.dumps({"label": wrong})
    return json.dumps({"label": label}, ensure_ascii=False)


def extract(prompt: Prompt, invalid: bool, value: Any) -> str:
    """`value`, the quality model's, valid against the job's schema; or with `invalid`, not."""
    if invalid:
        schema = prompt.json_section("schema")
        bad = break_value(schema if schema is not None else {"type": "object"}, value)
        if bad is None or pick(prompt.digest, "invalid-extract", 3) == 0:
            return "Here are the fields you asked for: " + BAD_OUTPUT_MARKER
        return json.dumps(bad, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)


def write(prompt: Prompt, invalid: bool) -> str:
    """A draft or a generation: a few sentences that visibly answer the instructions or prompt."""
    ask = _snippet(prompt.section("instructions") or prompt.section("prompt") or job_text(prompt))
    context = _snippet(prompt.section("context") or prompt.section("text") or "", words=10)
    sentences = [
        f"As requested ({ask}), here is the result.",
        (f"It builds on the context provided, in particular: {context}." if context else
         "It keeps to the point and covers what was asked."),
        ("Each part follows the requested form, and the wording stays clear and direct.",
         "The tone is friendly and professional, and the key points come first.",
         "It is concise, and every statement can be checked against the input.")[
            pick(prompt.digest, "write", 3)],
    ]
    if prompt.section("feedback") is not None:
        sentences.append("This version also fixes the problems raised in the feedback.")
    if invalid:
        sentences.append(f"{BAD_OUTPUT_MARKER} [NAME] to fill in.")
    return " ".join(sentences)


def format_check(prompt: Prompt) -> str:
    output = prompt.section("output") or ""
    problems: list[str] = []
    if not output.strip():
        problems.append("the answer is empty")
    elif BAD_OUTPUT_MARKER in output:
        problems.append(f"the answer contains the placeholder marker {BAD_OUTPUT_MARKER}")
    return json.dumps({"ok": not problems, "problems": problems})


def judge(prompt: Prompt) -> str:
    """Shadow evaluation's pairwise question: as good when the two answers are the same once
    whitespace and case are set aside, not as good otherwise."""
    routed, reference = (" ".join((prompt.section(n) or "").split()).casefold()
                         for n in ("routed_answer", "reference_answer"))
    if routed == reference:
        return json.dumps({"as_good": True, "reason": "The two answers say the same thing."})
    return json.dumps({"as_good": False, "reason": "The routed answer differs from the reference answer."})


def other(prompt: Prompt) -> str:
    return _OTHER[pick(prompt.digest, "other", len(_OTHER))]


def malformed(text: str) -> str:
    """Cut JSON short (or start JSON and stop) so that no JSON parser accepts it."""
    body = text if text.lstrip().startswith(("{", "[")) else json.dumps({"answer": text})
    return body[: max(1, len(body) // 2)].rstrip("}] ") + ', "'


def _labels(prompt: Prompt) -> list[str]:
    labels = prompt.json_section("labels")
    if isinstance(labels, list):
        return [label for label in labels if isinstance(label, str)]
    return []




def _snippet(text: str, words: int = 14) -> str:
    parts = strip_hints(text).split()
    snippet = " ".join(parts[:words]).rstrip(".,;:")
    return snippet + ("..." if len(parts) > words else "") if snippet else "the task"
