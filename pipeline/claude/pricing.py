"""What a call costs, from the per-tier prices in configuration."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.config import ModelConfig, TierConfig

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def billed_input_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


def call_cost(tier: TierConfig, usage: Usage, *, config: ModelConfig) -> Decimal:
    """USD for one call. Cache writes and reads are priced as multiples of the input price."""
    per_in = tier.input_per_mtok / MILLION
    per_out = tier.output_per_mtok / MILLION
    return (
        usage.input_tokens * per_in
        + usage.cache_creation_input_tokens * per_in * config.cache_write_multiplier
        + usage.cache_read_input_tokens * per_in * config.cache_read_multiplier
        + usage.output_tokens * per_out
    )
