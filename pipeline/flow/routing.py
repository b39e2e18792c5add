"""The routing policy: triage verdict -> tier, and what happens after a failed validation.

Plain functions over the configuration, so the policy is tested without a broker or a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.config import DIFFICULTIES, RoutingPolicy

AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class TriageVerdict:
    difficulty: str  # easy | medium | hard | ambiguous
    confidence: float | None
    reason: str
    parsed: bool
    # The difficulty the answer named, whatever its confidence; None if it named none.
    triaged_as: str | None = None


def _json_object(text: str) -> str:
    """From the first '{' to the last '}' (the object inside any prose around it), or the whole
    text. Found with find and rfind: a backtracking search took quadratic time on a long answer
    of braces that never close, and the answer is a model's, steerable by a job's text."""
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if -1 < start < end else text


def parse_triage(text: str | None, *, min_confidence: float, stop_reason: str | None = None) -> TriageVerdict:
    """Read a triage answer. Anything unparseable or unsure is ``ambiguous``, never an error: the
    job then goes to the strongest tier instead of being lost. ``stop_reason`` says why the answer
    ended: a refusal is no verdict, and an answer cut at max_tokens that does not read says so
    (structured outputs hold an answer to the verdict's schema, except in those two cases)."""
    if stop_reason == "refusal":
        return TriageVerdict(AMBIGUOUS, None, "the model refused to triage the job", parsed=False)
    verdict = _read_triage(text, min_confidence=min_confidence)
    if stop_reason == "max_tokens" and not verdict.parsed:
        return TriageVerdict(AMBIGUOUS, None, "the triage answer was cut off at max_tokens", parsed=False)
    return verdict


def _read_triage(text: str | None, *, min_confidence: float) -> TriageVerdict:
    if not text or not text.strip():
        return TriageVerdict(AMBIGUOUS, None, "empty triage answer", parsed=False)
    try:
        data = json.loads(_json_object(text))
    # ValueError besides JSONDecodeError: an integer of more than 4,300 digits, which Python refuses
    # to convert (its guard against quadratic time).
    except (ValueError, RecursionError):
        return TriageVerdict(AMBIGUOUS, None, "triage answer is not JSON", parsed=False)
    if not isinstance(data, dict):
        return TriageVerdict(AMBIGUOUS, None, "triage answer is not a JSON object", parsed=False)

    difficulty = data.get("difficulty")
    reason = data.get("reason")
    reason = reason.strip()[:500] if isinstance(reason, str) else ""
    if not isinstance(difficulty, str) or difficulty.lower().strip() not in DIFFICULTIES:
        return TriageVerdict(AMBIGUOUS, None, f"unknown difficulty {difficulty!r}", parsed=False)
    difficulty = difficulty.lower().strip()

    confidence = data.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence <= 1:
        return TriageVerdict(AMBIGUOUS, None, f"{difficulty}, but confidence {confidence!r} is not in [0, 1]",
                             parsed=False, triaged_as=difficulty)
    if confidence < min_confidence:
        return TriageVerdict(AMBIGUOUS, float(confidence),
                             f"{difficulty} with low confidence {confidence:.2f}: {reason}", parsed=True,
                             triaged_as=difficulty)
    return TriageVerdict(difficulty, float(confidence), reason, parsed=True, triaged_as=difficulty)


def tier_for(verdict: TriageVerdict, policy: RoutingPolicy) -> str:
    if verdict.difficulty == AMBIGUOUS:
        return policy.ambiguous
    return policy.by_difficulty[verdict.difficulty]


@dataclass(frozen=True)
class NextStep:
    action: str  # retry | escalate | fail
    tier: str | None
    attempt: int


def after_failed_validation(tier: str, attempt: int, policy: RoutingPolicy, *, retryable: bool = True) -> NextStep:
    """``attempt`` counts work attempts at ``tier`` so far (1 after the first).

    Retry at the same tier up to ``retries_per_tier`` times, then move one step up the escalation
    chain, then fail. A tier outside the chain (pinned elsewhere) only retries. A failure that is
    not ``retryable`` (the job's own schema cannot be checked: no answer could pass) fails at once."""
    if not retryable:
        return NextStep("fail", None, attempt)
    if attempt <= policy.retries_per_tier:
        return NextStep("retry", tier, attempt + 1)
    chain = policy.escalation
    if tier in chain and chain.index(tier) + 1 < len(chain):
        return NextStep("escalate", chain[chain.index(tier) + 1], 1)
    return NextStep("fail", None, attempt)
