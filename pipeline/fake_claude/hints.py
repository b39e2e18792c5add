"""Typed reading of the [fake:NAME=VALUE] hints; malformed or unknown hints are ignored, because
a hint is test scaffolding inside job text and must never turn a request into an error by itself."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.fake_claude.models import MODEL_CLASSES
from pipeline.fake_claude.options import BATCH_OUTCOMES, KNOWN_FAULTS
from pipeline.fake_claude.rates import DIFFICULTIES


@dataclass(frozen=True)
class ErrorHint:
    fault: str                      # a KNOWN_FAULTS name
    classes: frozenset[str] | None  # None: every model class
    times: int | None               # None: every matching request

    def applies_to(self, model_class: str | None) -> bool:
        return self.classes is None or model_class in self.classes


@dataclass(frozen=True)
class Hints:
    difficulty: str | None = None
    confidence: float | None = None
    triage_garbage: bool = False
    invalid_classes: frozenset[str] = frozenset()
    invalid_once: bool = False
    error: ErrorHint | None = None
    # Only inside a message batch: the request ends errored, expired or canceled (fault is the name).
    batch: ErrorHint | None = None
    latency_ms: float | None = None
    truth: str | None = None  # the job's true label, for the quality model (truth.py)

    def wants_invalid(self, model_class: str | None, has_feedback: bool) -> bool:
        if self.invalid_once and has_feedback:
            return False
        if self.invalid_classes:
            return model_class in self.invalid_classes
        return self.invalid_once


def _classes(spec: str) -> frozenset[str] | None:
    names = {part.strip().lower() for part in spec.split(",") if part.strip()}
    if "all" in names:
        return frozenset(MODEL_CLASSES)
    known = names & set(MODEL_CLASSES)
    return frozenset(known) if known else None


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _fault_hint(raw: dict[str, str], name: str, known: frozenset[str]) -> ErrorHint | None:
    """[fake:NAME=FAULT] or [fake:NAME=FAULT@CLASS,...], with [fake:times=N]."""
    spec = raw.get(name)
    if not spec:
        return None
    fault, _, class_spec = spec.partition("@")
    fault = fault.strip().lower()
    if fault not in known:
        return None
    classes = _classes(class_spec) if class_spec else None
    if class_spec and classes is None:
        return None  # "@nonsense" names no class: safer to inject nothing than everything
    times_value = raw.get("times", "")
    times = int(times_value) if times_value.isdigit() and int(times_value) > 0 else None
    return ErrorHint(fault=fault, classes=classes, times=times)


def read_hints(raw: dict[str, str]) -> Hints:
    difficulty = raw.get("difficulty", "").lower()
    confidence = _float(raw.get("confidence", ""))
    latency = _float(raw.get("latency_ms", ""))
    invalid = _classes(raw["invalid"]) if raw.get("invalid") else None
    return Hints(
        difficulty=difficulty if difficulty in DIFFICULTIES else None,
        confidence=min(1.0, max(0.0, confidence)) if confidence is not None else None,
        triage_garbage=raw.get("triage", "").lower() == "garbage",
        invalid_classes=invalid or frozenset(),
        invalid_once="invalid_once" in raw,
        error=_fault_hint(raw, "error", KNOWN_FAULTS),
        batch=_fault_hint(raw, "batch", frozenset(BATCH_OUTCOMES)),
        latency_ms=latency if latency is not None and latency >= 0 else None,
        truth=raw.get("truth") or None,
    )
