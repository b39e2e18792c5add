"""Options of the fake Claude server and the fault vocabulary shared by options and hints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.fake_claude.models import CACHE_MIN_TOKENS, DEFAULT_MODELS
from pipeline.fake_claude.rates import ErrorRates, complete_error_rates

# HTTP errors the fake can inject, by status code, with the error.type the real API uses.
ERROR_FAULTS: dict[str, tuple[int, str]] = {
    "400": (400, "invalid_request_error"),
    "401": (401, "authentication_error"),
    "403": (403, "permission_error"),
    "404": (404, "not_found_error"),
    "413": (413, "request_too_large"),
    "429": (429, "rate_limit_error"),
    "500": (500, "api_error"),
    "529": (529, "overloaded_error"),
}
# Faults that are not an HTTP error status: they misbehave at the transport or in the answer.
# max_tokens: the answer stops short, as if it had hit the request's max_tokens.
BEHAVIOUR_FAULTS: tuple[str, ...] = ("stall", "drop", "empty", "malformed", "refusal", "max_tokens")
KNOWN_FAULTS: frozenset[str] = frozenset(ERROR_FAULTS) | frozenset(BEHAVIOUR_FAULTS)
# What a request inside a message batch can be made to end as, besides succeeded (batches.py).
BATCH_OUTCOMES: tuple[str, ...] = ("errored", "expired", "canceled")
DEFAULT_FAULTS: tuple[str, ...] = ("429", "529", "500", "stall", "drop", "malformed", "empty", "refusal")


def parse_faults(spec: str) -> tuple[str, ...]:
    """Parse a comma list such as "429,529,drop"; raise ValueError naming any unknown fault."""
    names = tuple(part.strip() for part in spec.split(",") if part.strip())
    unknown = [name for name in names if name not in KNOWN_FAULTS]
    if unknown:
        raise ValueError(
            f"unknown fault(s): {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_FAULTS))})"
        )
    if not names:
        raise ValueError("empty fault list")
    return names


def parse_cache_min_tokens(spec: str) -> dict[str, int]:
    """Parse "haiku=2048,claude-opus-5-5=1024" (model classes or ids); raise ValueError naming a bad
    entry."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, value = part.partition("=")
        if not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{part!r}: expected NAME=TOKENS, a model class or id and a positive integer")
        out[name.strip()] = int(value)
    return out


def parse_batch_error_rates(spec: str) -> dict[str, float]:
    """Read `--batch-error-rates`: "errored=0.02,expired=0.01" (canceled too); the shares of batch
    requests ending so. A ValueError's message is one sentence naming the mistake."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in BATCH_OUTCOMES:
            raise ValueError(f"{part!r}: expected OUTCOME=RATE with OUTCOME one of {', '.join(BATCH_OUTCOMES)}")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: the rate must be a number from 0 to 1") from None
        out[name] = rate
    check_batch_error_rates(out)
    return out


def check_batch_error_rates(rates: Mapping[str, float]) -> None:
    unknown = [name for name in rates if name not in BATCH_OUTCOMES]
    if unknown:
        raise ValueError(f"batch error rates: unknown outcome {', '.join(unknown)} "
                         f"(known: {', '.join(BATCH_OUTCOMES)})")
    bad = [name for name, rate in rates.items() if not 0.0 <= rate <= 1.0]
    if bad:
        raise ValueError(f"batch error rates: the rate of {', '.join(bad)} must be from 0 to 1")
    if sum(rates.values()) > 1.0:
        raise ValueError("batch error rates: the rates add up to more than 1")


@dataclass(frozen=True)
class FakeOptions:
    latency_ms: float = 0
    latency_jitter_ms: float = 0
    # Log-normal latency: when > 0, each answer waits latency_ms * exp(sigma * Z), Z standard normal,
    # so latency_ms is the median and exp(2.326 * sigma) the ratio of the p99 to it (sigma 0.692:
    # the p99 is 5x the median). Model latency has that long right tail; a steady one makes waves.
    latency_sigma: float = 0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = DEFAULT_FAULTS
    seed: int = 0
    stall_seconds: float = 30.0
    retry_after_s: float = 1.0
    api_key: str | None = None
    # Per model class (haiku/sonnet/opus), per minute; None means not enforced.
    rpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    # The period the three limits are per: a minute, as the API's; shorter for quick benchmarks.
    rate_window_s: float = 60.0
    # Only what GET /v1/models lists; any id of the documented shape is accepted by /v1/messages.
    models: tuple[str, ...] = field(default=DEFAULT_MODELS)
    # The shortest cacheable prefix in tokens, by model class or exact model id (the id wins); a
    # class or id not given keeps its default.
    cache_min_tokens: Mapping[str, int] = field(default_factory=lambda: dict(CACHE_MIN_TOKENS))
    # The quality model (quality.py): per model class and true difficulty, the share of classify and
    # extract answers that are wrong; None turns it off (every answer right). A class or difficulty
    # not named is 0; rates.DEFAULT_ERROR_RATES is a sensible table. `seed` varies which jobs err.
    error_rates: ErrorRates | None = None
    # The share of triage verdicts replaced by another difficulty than the job's true one.
    triage_noise: float = 0.0
    # Message batches (batches.py): a batch ends this long after its creation, and its requests end
    # errored, expired or canceled at these rates (drawn in order from `seed`), the rest succeeded.
    batch_delay_s: float = 0.0
    batch_error_rates: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")
        if self.fault_rate > 0 and not self.faults:
            raise ValueError("fault_rate > 0 needs at least one fault")
        unknown = [f for f in self.faults if f not in KNOWN_FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(unknown)}")
        check_batch_error_rates(self.batch_error_rates)
        for name in ("latency_ms", "latency_jitter_ms", "latency_sigma", "stall_seconds", "retry_after_s",
                     "batch_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("rpm", "itpm", "otpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer or None")
        if self.rate_window_s <= 0:
            raise ValueError("rate_window_s must be > 0")
        bad = [k for k, v in self.cache_min_tokens.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"cache_min_tokens must be positive integers; not for {', '.join(bad)}")
        if self.error_rates is not None:
            object.__setattr__(self, "error_rates", complete_error_rates(self.error_rates))
        if not 0.0 <= self.triage_noise <= 1.0:
            raise ValueError(f"triage_noise must be within [0, 1], got {self.triage_noise}")
        # Merged over the defaults, so naming one class leaves the others as documented.
        object.__setattr__(self, "cache_min_tokens", {**CACHE_MIN_TOKENS, **self.cache_min_tokens})
