"""What the fake says, by purpose. Everything derives from the prompt digest, so the same request
always gets the same answer."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pipeline.fake_claude.hints import Hints
from pipeline.fake_claude.prompt import Prompt, pick, strip_hints, unit
from pipeline.fake_claude.schema_values import SchemaFaker, break_value

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


def triage(prompt: Prompt, hints: Hints) -> str:
    if hints.triage_garbage:
        return "Hmm, this one looks fairly doable to me, though it is hard to say for sure."
    text = job_text(prompt)
    # Longer and more structured jobs lean harder; the hash spreads jobs of equal size.
    size_score = min(1.0, math.log10(1 + len(text)) / 4)
    structure = min(0.2, 0.02 * (len(_labels(prompt)) + len(_schema_keys(prompt.section("schema")))))
    score = 0.5 * unit(prompt.digest, "difficulty") + 0.5 * size_score + structure
    difficulty = "easy" if score < 0.45 else "medium" if score < 0.7 else "hard"
    difficulty = hints.difficulty or difficulty
    confidence = hints.confidence
    if confidence is None:
        confidence = round(0.85 + 0.12 * unit(prompt.digest, "confidence"), 2)
    reason = _REASONS[difficulty][pick(prompt.digest, "reason", 2)]
    return json.dumps({"difficulty": difficulty, "confidence": confidence, "reason": reason})


def classify(prompt: Prompt, invalid: bool) -> str:
    labels = _labels(prompt)
    if invalid or not labels:
        wrong = "none_of_the_above"
        while wrong in labels:
            wrong += "_"
        return json.dumps({"label": wrong})
    words = set(re.findall(r"[a-z0-9]+", job_text(prompt).lower()))
    scores = [len(set(re.findall(r"[a-z0-9]+", label.lower())) & words) for label in labels]
    best = max(scores)
    # A label named in the text wins; with none named, any label is as plausible as another.
    candidates = [label for label, score in zip(labels, scores, strict=True) if score == best] if best else labels
    return json.dumps({"label": candidates[pick(prompt.digest, "label", len(candidates))]},
                      ensure_ascii=False)


def extract(prompt: Prompt, invalid: bool) -> str:
    schema = _json(prompt.section("schema"))
    if schema is None:
        schema = {"type": "object"}
    good = SchemaFaker(schema, job_text(prompt), prompt.digest).value()
    if invalid:
        bad = break_value(schema, good)
        if bad is None or pick(prompt.digest, "invalid-extract", 3) == 0:
            return "Here are the fields you asked for: " + BAD_OUTPUT_MARKER
        return json.dumps(bad, ensure_ascii=False)
    return json.dumps(good, ensure_ascii=False)


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


def other(prompt: Prompt) -> str:
    return _OTHER[pick(prompt.digest, "other", len(_OTHER))]


def malformed(text: str) -> str:
    """Cut JSON short (or start JSON and stop) so that no JSON parser accepts it."""
    body = text if text.lstrip().startswith(("{", "[")) else json.dumps({"answer": text})
    return body[: max(1, len(body) // 2)].rstrip("}] ") + ', "'


def _labels(prompt: Prompt) -> list[str]:
    labels = _json(prompt.section("labels"))
    if isinstance(labels, list):
        return [label for label in labels if isinstance(label, str)]
    return []


def _schema_keys(raw: str | None) -> list[str]:
    schema = _json(raw)
    props = schema.get("properties") if isinstance(schema, dict) else None
    return list(props) if isinstance(props, dict) else []


def _json(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None


def _snippet(text: str, words: int = 14) -> str:
    parts = strip_hints(text).split()
    snippet = " ".join(parts[:words]).rstrip(".,;:")
    return snippet + ("..." if len(parts) > words else "") if snippet else "the task"
