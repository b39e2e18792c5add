"""Model configuration: which model serves each tier, what it costs, and the routing policy.

It is read from a TOML file (the bundled ``defaults.toml`` unless ``SWITCHYARD_CONFIG`` names
another), so swapping a model or a price is a change of configuration, never of code.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass, field, fields
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

DIFFICULTIES = ("easy", "medium", "hard")
# The stages' own queues. A work tier's queue is named after the tier, so no work tier may take
# one of these names: its jobs would land in the stage's queue, served by the stage's task.
STAGE_QUEUES = ("triage", "validate")
ROUTING_KEYS = (*DIFFICULTIES, "ambiguous", "min_confidence", "retries_per_tier", "escalation", "shadow_rate",
                "reference_tier", "judge_tier")
STAGES_KEYS = ("triage_tier", "format_check_tier")
# How long a prompt-cache entry lives: the two lifetimes the API offers, each with its write price.
CACHE_TTLS = ("5m", "1h")
CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
# A tier table without cache_min_tokens: the largest minimum the documentation gives (Haiku's and
# Opus's). Too high only leaves a shorter shared prefix uncached; too low marks prefixes the model
# silently does not cache.
DEFAULT_CACHE_MIN_TOKENS = 4096


@dataclass(frozen=True)
class TierConfig:
    name: str
    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    context_tokens: int = 200_000
    # The organisation's limits for this model class, per minute: requests, input tokens, output
    # tokens. 0 means not limited here. Every worker of the tier shares them (pipeline.claude.ratelimit).
    rpm: int = 0
    itpm: int = 0
    otpm: int = 0
    # Prompt caching: a prefix shorter than the model's minimum is silently not cached, so a
    # breakpoint goes only after a shared part at least this long; and how long an entry lives
    # ("5m" or "1h", each written at its own price).
    cache_min_tokens: int = DEFAULT_CACHE_MIN_TOKENS
    cache_ttl: str = "5m"
    # Whether the model takes output_config.format (structured outputs). Off unless configured: a
    # model without them would refuse every call that asked.
    structured_outputs: bool = False

    @property
    def cache_ttl_s(self) -> float:
        return CACHE_TTL_SECONDS[self.cache_ttl]


@dataclass(frozen=True)
class RoutingPolicy:
    by_difficulty: dict[str, str]
    ambiguous: str
    min_confidence: float
    retries_per_tier: int
    escalation: tuple[str, ...]
    # Shadow evaluation (pipeline.flow.shadow): the share of succeeded jobs also worked by the
    # reference tier, to measure what routing costs in quality. 0 turns it off. A batch
    # (enqueue --shadow-rate) or a task (its shadow_rate field) may set its own.
    shadow_rate: float = 0.0
    # The tier whose answer a shadowed job's is compared with; None: the top of the escalation chain.
    reference_tier: str | None = None
    # The tier that judges a draft or a generation against the reference's (a pairwise yes/no);
    # None: the reference tier, since a judge weaker than the answers it compares proves little.
    judge_tier: str | None = None

    @property
    def reference(self) -> str:
        return self.reference_tier or self.escalation[-1]

    @property
    def judge(self) -> str:
        return self.judge_tier or self.reference


@dataclass(frozen=True)
class Limits:
    triage_max_tokens: int = 200
    work_max_tokens: int = 2048
    format_check_max_tokens: int = 300


@dataclass(frozen=True)
class EconomyConfig:
    """Economy mode's message batches ([economy]; pipeline.flow.economy): a model's pending calls
    go as one message batch once there are ``max_requests`` of them or the oldest has waited
    ``max_age_s``; open batches are polled every ``poll_interval_s``. A "creating" batch row older
    than ``create_timeout_s`` (its dispatcher died before recording the API's answer) is reconciled
    with the API's list of batches."""

    max_requests: int = 100_000
    max_age_s: float = 60.0
    poll_interval_s: float = 10.0
    create_timeout_s: float = 120.0


@dataclass(frozen=True)
class ModelConfig:
    tiers: dict[str, TierConfig]
    routing: RoutingPolicy
    limits: Limits = field(default_factory=Limits)
    # Multiples of a tier's input price: a 5-minute cache write, a 1-hour one, a cache read.
    cache_write_multiplier: Decimal = Decimal("1.25")
    cache_write_1h_multiplier: Decimal = Decimal("2")
    cache_read_multiplier: Decimal = Decimal("0.10")
    # The Message Batches discount: every token of a call made in a message batch (economy mode)
    # costs this multiple of its price, cache writes and reads included (the discounts stack).
    batch_multiplier: Decimal = Decimal("0.5")
    economy: EconomyConfig = field(default_factory=EconomyConfig)
    # The cheap tier that triages and checks formats; the work tiers are the routing targets.
    triage_tier: str = "haiku"
    format_check_tier: str = "haiku"
    # [caching] enabled: False sends every prompt without a cache_control breakpoint, whatever its
    # length (to measure what caching saves, or for a model or account that must not cache).
    caching: bool = True
    # Where it was read from ("defaults.toml" or the file SWITCHYARD_CONFIG names), for messages.
    source: str = "configuration"

    def cache_write_multiplier_for(self, ttl: str) -> Decimal:
        """The price of a cache write that lives ``ttl`` ("5m" or "1h"), as a multiple of input."""
        return self.cache_write_1h_multiplier if ttl == "1h" else self.cache_write_multiplier

    def tier(self, name: str) -> TierConfig:
        try:
            return self.tiers[name]
        except KeyError:
            raise ConfigError(f"no tier named {name!r} in the model configuration") from None

    def min_cache_tokens(self, name: str) -> int:
        """The shortest prompt prefix the tier's model caches, in tokens: 1,024 for Sonnet, 4,096 for
        Haiku and Opus (a prefix below it is sent with no breakpoint, as the API would not cache it)."""
        return self.tier(name).cache_min_tokens

    @property
    def work_tiers(self) -> tuple[str, ...]:
        """The tiers that work jobs, each with a queue of its own: every tier the policy routes to or
        escalates through (Haiku among them when the policy sends it jobs, not only triage)."""
        seen = dict.fromkeys([*self.routing.by_difficulty.values(), self.routing.ambiguous,
                              *self.routing.escalation])
        return tuple(seen)

    @property
    def queues(self) -> list[str]:
        """The broker queues, one per stage and work tier, in the order a job meets them."""
        return ["triage", *self.work_tiers, "validate"]

    def queue_tier(self, queue: str) -> str:
        """The tier whose model (and rate-limit budget) a queue's stage calls: triage calls the
        triage tier, validate the format check's tier, and each work queue is named after its tier."""
        return {"triage": self.triage_tier, "validate": self.format_check_tier}.get(queue, queue)

    @property
    def top_tier(self) -> str:
        """The tier every job would go to without routing: the baseline of the savings figure."""
        return self.routing.escalation[-1]


def _decimal(raw: dict[str, Any], key: str, where: str, default: str | None = None) -> Decimal:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: missing {key!r}")
    try:
        number = Decimal(str(value)) if not isinstance(value, bool) else Decimal("nan")
    except ArithmeticError:
        number = Decimal("nan")
    if not number.is_finite():
        raise ConfigError(f"{where}: {key!r} must be a number, not {value!r}")
    if number < 0:
        raise ConfigError(f"{where}: {key!r} must not be negative")
    return number


def _limit(raw: dict[str, Any], key: str, where: str) -> int:
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key!r} must be a whole number of at least 0 (0: no limit), not {value!r}")
    return value


# Every value is checked for its type where it is read, so that a mistyped one is a sentence naming
# it, not a ValueError or TypeError from wherever it is first used.


def _whole(raw: dict[str, Any], key: str, where: str, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {key!r} must be a whole number of at least {minimum}, not {value!r}")
    return value


def _number(raw: dict[str, Any], key: str, where: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key!r} must be a number, not {value!r}")
    return float(value)


def _name(raw: dict[str, Any], key: str, where: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a tier name (a string), not {value!r}")
    return value


def _optional_name(raw: dict[str, Any], key: str, where: str) -> str | None:
    if key not in raw:
        return None
    return _name(raw, key, where, "") or None


def check_rate(value: Any) -> float | None:
    """A sampling rate as a float in [0, 1], or None if it is not one (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return None
    return float(value)


def _rate(raw: dict[str, Any], key: str, where: str) -> float:
    value = raw.get(key, 0.0)
    rate = check_rate(value)
    if rate is None:
        raise ConfigError(f"{where}: {key!r} must be a number from 0 to 1 (the share of jobs sampled), not {value!r}")
    return rate


def _names(raw: dict[str, Any], key: str, where: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = raw.get(key, default)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of tier names, such as [\"sonnet\", \"opus\"], "
                          f"not {value!r}")
    return tuple(value)


def _table(raw: dict[str, Any], key: str, source: str, *, known: tuple[str, ...] | None = None) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{key}] must be a table, not {value!r}")
    # A misspelt key would otherwise be ignored and its default used in silence ("eazy = 'haiku'"
    # leaving easy jobs on Sonnet).
    if known is not None and (unknown := sorted(value.keys() - set(known))):
        raise ConfigError(f"{source} [{key}]: unknown key {unknown[0]!r} (expected some of {', '.join(known)})")
    return value


def _check_policy(r: dict[str, Any], routing: RoutingPolicy, tiers: dict[str, TierConfig], where: str) -> None:
    """Every tier the policy names must be configured, a work tier must not take a stage's queue
    name, and the escalation chain must name each tier once: one sentence naming the key."""
    configured = ", ".join(tiers)
    named = [(d, routing.by_difficulty[d]) for d in DIFFICULTIES] + [("ambiguous", routing.ambiguous)]
    for key, tier in [*named, *(("escalation", t) for t in routing.escalation)]:
        if tier not in tiers:
            if key not in r:
                raise ConfigError(f"{where}: {key!r} is not set, and its default tier {tier!r} has no "
                                  f"[tiers.{tier}] table: set it to one of {configured}")
            raise ConfigError(f"{where}: {key!r} names tier {tier!r}, which has no [tiers.{tier}] table "
                              f"(the tiers are {configured})")
        if tier in STAGE_QUEUES:
            raise ConfigError(f"{where}: {key!r} names tier {tier!r} as a work tier, but a work tier's queue "
                              f"is named after it and {tier!r} is the {tier} stage's queue: rename the tier")
    if not routing.escalation:
        raise ConfigError(f"{where}: 'escalation' must name at least one tier")
    twice = next((t for i, t in enumerate(routing.escalation) if t in routing.escalation[:i]), None)
    if twice is not None:
        raise ConfigError(f"{where}: 'escalation' names tier {twice!r} twice: each tier may appear once in the "
                          f"chain, cheapest first, such as [\"haiku\", \"sonnet\", \"opus\"]")


def _limits(raw: dict[str, Any], where: str) -> Limits:
    defaults = Limits()
    known: dict[str, int] = {f.name: getattr(defaults, f.name) for f in fields(Limits)}
    unknown = sorted(raw.keys() - known.keys())
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected some of {', '.join(known)})")
    return Limits(**{name: _whole(raw, name, where, default, 1) for name, default in known.items()})


def _cache_min_tokens(raw: dict[str, Any], where: str) -> int:
    value = raw.get("cache_min_tokens", DEFAULT_CACHE_MIN_TOKENS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: 'cache_min_tokens' must be a whole number of tokens, at least 1, not {value!r}")
    return value


def _cache_ttl(raw: dict[str, Any], where: str) -> str:
    value = raw.get("cache_ttl", "5m")
    if value not in CACHE_TTLS:
        raise ConfigError(f"{where}: 'cache_ttl' must be \"5m\" or \"1h\", not {value!r}")
    return str(value)


def _flag(raw: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} must be true or false, not {value!r}")
    return value


def _caching(raw: dict[str, Any], where: str) -> bool:
    unknown = sorted(raw.keys() - {"enabled"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected enabled)")
    return _flag(raw, "enabled", where, default=True)


def _economy(raw: dict[str, Any], where: str) -> EconomyConfig:
    d = EconomyConfig()
    unknown = sorted(raw.keys() - {f.name for f in fields(EconomyConfig)})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected some of "
                          f"{', '.join(f.name for f in fields(EconomyConfig))})")
    max_requests = _whole(raw, "max_requests", where, d.max_requests, 1)
    if max_requests > 100_000:
        raise ConfigError(f"{where}: 'max_requests' must be at most 100000 (the API's most per message batch), "
                          f"not {max_requests}")
    out = EconomyConfig(max_requests=max_requests, max_age_s=_number(raw, "max_age_s", where, d.max_age_s),
                        poll_interval_s=_number(raw, "poll_interval_s", where, d.poll_interval_s),
                        create_timeout_s=_number(raw, "create_timeout_s", where, d.create_timeout_s))
    for name in ("max_age_s", "poll_interval_s", "create_timeout_s"):
        if not 0 < getattr(out, name) <= 86400:
            raise ConfigError(f"{where}: {name!r} must be a number of seconds above 0 and at most 86400, "
                              f"not {getattr(out, name)!r}")
    return out


def parse_config(raw: dict[str, Any], *, source: str = "configuration") -> ModelConfig:
    tiers_raw = raw.get("tiers")
    if not isinstance(tiers_raw, dict) or not tiers_raw:
        raise ConfigError(f"{source}: needs a [tiers.NAME] table for each tier")
    tiers: dict[str, TierConfig] = {}
    for name, t in tiers_raw.items():
        where = f"{source} [tiers.{name}]"
        if not isinstance(t, dict) or not isinstance(t.get("model"), str) or not t["model"]:
            raise ConfigError(f"{where}: needs a model id, e.g. model = \"claude-sonnet-5-5\"")
        tiers[name] = TierConfig(
            name=name,
            model=t["model"],
            input_per_mtok=_decimal(t, "input_per_mtok", where),
            output_per_mtok=_decimal(t, "output_per_mtok", where),
            context_tokens=_whole(t, "context_tokens", where, 200_000, 1),
            rpm=_limit(t, "rpm", where),
            itpm=_limit(t, "itpm", where),
            otpm=_limit(t, "otpm", where),
            cache_min_tokens=_cache_min_tokens(t, where),
            cache_ttl=_cache_ttl(t, where),
            structured_outputs=_flag(t, "structured_outputs", where),
        )

    r, where = _table(raw, "routing", source, known=ROUTING_KEYS), f"{source} [routing]"
    by_difficulty = {d: _name(r, d, where, "opus" if d == "hard" else "sonnet") for d in DIFFICULTIES}
    routing = RoutingPolicy(
        by_difficulty=by_difficulty,
        ambiguous=_name(r, "ambiguous", where, "opus"),
        min_confidence=_number(r, "min_confidence", where, 0.6),
        retries_per_tier=_whole(r, "retries_per_tier", where, 1, 0),
        escalation=_names(r, "escalation", where, ("sonnet", "opus")),
        shadow_rate=_rate(r, "shadow_rate", where),
        reference_tier=_optional_name(r, "reference_tier", where),
        judge_tier=_optional_name(r, "judge_tier", where),
    )
    _check_policy(r, routing, tiers, where)
    stages, where = _table(raw, "stages", source, known=STAGES_KEYS), f"{source} [stages]"
    pricing = _table(raw, "pricing", source)
    config = ModelConfig(
        tiers=tiers,
        routing=routing,
        limits=_limits(_table(raw, "limits", source), f"{source} [limits]"),
        cache_write_multiplier=_decimal(pricing, "cache_write_multiplier", f"{source} [pricing]", "1.25"),
        cache_write_1h_multiplier=_decimal(pricing, "cache_write_1h_multiplier", f"{source} [pricing]", "2"),
        cache_read_multiplier=_decimal(pricing, "cache_read_multiplier", f"{source} [pricing]", "0.10"),
        batch_multiplier=_decimal(pricing, "batch_multiplier", f"{source} [pricing]", "0.5"),
        economy=_economy(_table(raw, "economy", source), f"{source} [economy]"),
        triage_tier=_name(stages, "triage_tier", where, "haiku"),
        format_check_tier=_name(stages, "format_check_tier", where, "haiku"),
        caching=_caching(_table(raw, "caching", source), f"{source} [caching]"),
        source=source,
    )
    for key in STAGES_KEYS:
        tier = getattr(config, key)
        if tier not in tiers:
            raise ConfigError(f"{where}: {key!r} {'names' if key in stages else 'is not set, and its default is'} "
                              f"tier {tier!r}, which has no [tiers.{tier}] table (the tiers are {', '.join(tiers)})")
    if not 0 <= routing.min_confidence <= 1:
        raise ConfigError(f"{source} [routing]: min_confidence must be between 0 and 1")
    if routing.reference not in config.work_tiers:
        raise ConfigError(f"{source} [routing]: 'reference_tier' {routing.reference!r} is not a work tier: "
                          f"expected one of {', '.join(config.work_tiers)}")
    if routing.judge not in tiers:
        raise ConfigError(f"{source} [routing]: 'judge_tier' {routing.judge!r} has no [tiers.{routing.judge}] table")
    return config


def load_config(path: str | Path | None = None) -> ModelConfig:
    """Read the model configuration from ``path``, or the bundled defaults."""
    if path is None:
        text = resources.files("pipeline").joinpath("defaults.toml").read_text()
        source = "defaults.toml"
    else:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read model configuration {p}: {exc.strerror}") from None
        source = str(p)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts: tomllib raises int()'s own error
        raise ConfigError(f"{source}: a number has more than {sys.get_int_max_str_digits():,} digits") from None
    return parse_config(raw, source=source)
