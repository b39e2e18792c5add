"""Model configuration: which model serves each tier, what it costs, and the routing policy.

It is read from a TOML file (the bundled ``defaults.toml`` unless ``SWITCHYARD_CONFIG`` names
another), so swapping a model or a price is a change of configuration, never of code.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

DIFFICULTIES = ("easy", "medium", "hard")


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


@dataclass(frozen=True)
class RoutingPolicy:
    by_difficulty: dict[str, str]
    ambiguous: str
    min_confidence: float
    retries_per_tier: int
    escalation: tuple[str, ...]


@dataclass(frozen=True)
class Limits:
    triage_max_tokens: int = 200
    work_max_tokens: int = 2048
    format_check_max_tokens: int = 300


@dataclass(frozen=True)
class ModelConfig:
    tiers: dict[str, TierConfig]
    routing: RoutingPolicy
    limits: Limits = field(default_factory=Limits)
    cache_write_multiplier: Decimal = Decimal("1.25")
    cache_read_multiplier: Decimal = Decimal("0.10")
    # The cheap tier that triages and checks formats; the work tiers are the routing targets.
    triage_tier: str = "haiku"
    format_check_tier: str = "haiku"

    def tier(self, name: str) -> TierConfig:
        try:
            return self.tiers[name]
        except KeyError:
            raise ConfigError(f"no tier named {name!r} in the model configuration") from None

    @property
    def work_tiers(self) -> tuple[str, ...]:
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


def _decimal(raw: dict[str, Any], key: str, where: str) -> Decimal:
    try:
        value = Decimal(str(raw[key]))
    except KeyError:
        raise ConfigError(f"{where}: missing {key!r}") from None
    except ArithmeticError:
        raise ConfigError(f"{where}: {key!r} must be a number, not {raw[key]!r}") from None
    if value < 0:
        raise ConfigError(f"{where}: {key!r} must not be negative")
    return value


def _limit(raw: dict[str, Any], key: str, where: str) -> int:
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key!r} must be a whole number of at least 0 (0: no limit), not {value!r}")
    return value


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
            context_tokens=int(t.get("context_tokens", 200_000)),
            rpm=_limit(t, "rpm", where),
            itpm=_limit(t, "itpm", where),
            otpm=_limit(t, "otpm", where),
        )

    r = raw.get("routing", {})
    by_difficulty = {d: str(r.get(d, "opus" if d == "hard" else "sonnet")) for d in DIFFICULTIES}
    routing = RoutingPolicy(
        by_difficulty=by_difficulty,
        ambiguous=str(r.get("ambiguous", "opus")),
        min_confidence=float(r.get("min_confidence", 0.6)),
        retries_per_tier=int(r.get("retries_per_tier", 1)),
        escalation=tuple(r.get("escalation", ("sonnet", "opus"))),
    )
    stages = raw.get("stages", {})
    config = ModelConfig(
        tiers=tiers,
        routing=routing,
        limits=Limits(**raw.get("limits", {})),
        cache_write_multiplier=Decimal(str(raw.get("pricing", {}).get("cache_write_multiplier", "1.25"))),
        cache_read_multiplier=Decimal(str(raw.get("pricing", {}).get("cache_read_multiplier", "0.10"))),
        triage_tier=str(stages.get("triage_tier", "haiku")),
        format_check_tier=str(stages.get("format_check_tier", "haiku")),
    )
    named = {*config.work_tiers, config.triage_tier, config.format_check_tier}
    missing = sorted(named - tiers.keys())
    if missing:
        raise ConfigError(f"{source}: routing names tier(s) {', '.join(missing)} with no [tiers.*] table")
    if not routing.escalation:
        raise ConfigError(f"{source} [routing]: escalation must name at least one tier")
    if not 0 <= routing.min_confidence <= 1:
        raise ConfigError(f"{source} [routing]: min_confidence must be between 0 and 1")
    if routing.retries_per_tier < 0:
        raise ConfigError(f"{source} [routing]: retries_per_tier must not be negative")
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
    return parse_config(raw, source=source)
