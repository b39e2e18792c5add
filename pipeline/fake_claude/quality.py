"""The fake's quality model: which answers come out wrong, and how often.

Each job has a true answer and a true difficulty (truth.py). A model class (haiku, sonnet, opus)
answers a classify or extract job wrongly with the probability its error rate gives for the job's true
difficulty. Whether it does is a hash of (seed, job text, model class, stage) against that rate, so a
retry, a shadow call or a replay on the same class gets the same answer, the classes err
independently, and raising a rate only adds wrong answers. A wrong answer is plausible: another of
the job's labels, or the extraction with one field holding another value its schema allows (a job
with one label, or a schema that leaves no field a choice, is always answered right). Triage reports
the true difficulty, but for a `triage_noise` share of jobs (by hash of seed and job text) one of the
other two.

Off unless error rates are given: then every answer is the truth, as the fake has always answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.fake_claude.models import MODEL_CLASSES, model_class
from pipeline.fake_claude.prompt import pick, unit
from pipeline.fake_claude.rates import DIFFICULTIES, ErrorRates, complete_error_rates
from pipeline.fake_claude.schema_values import SchemaFaker
from pipeline.fake_claude.truth import JUDGED_KINDS, Job, true_difficulty, true_label, true_value


@dataclass(frozen=True)
class Answer:
    """What one model class answers a job at one stage, with the truth to check it by."""

    value: Any          # a label (classify), a JSON value (extract), a difficulty (triage)
    wrong: bool
    difficulty: str     # the job's true difficulty


@dataclass(frozen=True)
class QualityModel:
    """The model's settings; its answers are pure functions of them and the job (see module doc)."""

    error_rates: ErrorRates | None = None  # None: off, every answer right
    triage_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.error_rates is not None:
            object.__setattr__(self, "error_rates", complete_error_rates(self.error_rates))
        if not 0.0 <= self.triage_noise <= 1.0:
            raise ValueError(f"triage_noise must be within [0, 1], got {self.triage_noise}")

    @property
    def enabled(self) -> bool:
        return self.error_rates is not None

    def rate(self, model: str, difficulty: str) -> float:
        """The error rate of a model class (or any model id of it) at a difficulty."""
        if self.error_rates is None:
            return 0.0
        klass = _class(model)
        return float(self.error_rates.get(klass, {}).get(difficulty, 0.0)) if klass else 0.0

    def errs(self, job: Job, kind: str, model: str) -> bool:
        """Whether the model class draws a wrong answer (one may still not exist: see `answer`)."""
        klass = _class(model)
        if kind not in JUDGED_KINDS or klass is None or self.error_rates is None:
            return False
        roll = unit(job.digest, f"wrong\0{self.seed}\0{klass}\0{kind}")
        return roll < self.rate(klass, true_difficulty(job))

    def answer(self, job: Job, kind: str, model: str, *, schema: Any = None) -> Answer:
        """What `model` answers a classify or extract job (extract: valid against `schema`, by default
        the job's), or triage reports (whatever the model: triage is wrong by `triage_noise` only)."""
        difficulty = true_difficulty(job)
        if kind == "triage":
            verdict = self.triage(job)
            return Answer(verdict, verdict != difficulty, difficulty)
        klass = _class(model) or model
        if kind == "classify":
            truth = true_label(job)
            others = [label for label in job.labels if label != truth]
            if not self.errs(job, kind, model) or not others:
                return Answer(truth, False, difficulty)
            wrong = others[pick(job.digest, f"wrong-label\0{self.seed}\0{klass}", len(others))]
            return Answer(wrong, True, difficulty)
        if kind == "extract":
            schema = job.schema if schema is None else schema
            schema = schema if isinstance(schema, dict) else {"type": "object"}
            good = true_value(job, schema)
            if not self.errs(job, kind, model):
                return Answer(good, False, difficulty)
            bad = SchemaFaker(schema, job.plain_text, job.digest).wrong_value(
                good, f"wrong-value\0{self.seed}\0{klass}")
            return Answer(good, False, difficulty) if bad is None else Answer(bad, True, difficulty)
        raise ValueError(f"no judged answer for kind {kind!r}: expected classify, extract or triage")

    def triage(self, job: Job) -> str:
        """The difficulty triage reports: the truth, or for a `triage_noise` share another one."""
        difficulty = true_difficulty(job)
        if self.triage_noise <= 0 or unit(job.digest, f"triage-noise\0{self.seed}") >= self.triage_noise:
            return difficulty
        others = [d for d in DIFFICULTIES if d != difficulty]
        return others[pick(job.digest, f"triage-swap\0{self.seed}", len(others))]

    def describe(self) -> dict[str, Any]:
        """For /_fake/stats: the settings the answers were drawn with."""
        rates = None if self.error_rates is None else {k: dict(v) for k, v in self.error_rates.items()}
        return {"enabled": self.enabled, "error_rates": rates, "triage_noise": self.triage_noise,
                "seed": self.seed}


def _class(model: str) -> str | None:
    return model if model in MODEL_CLASSES else model_class(model)
