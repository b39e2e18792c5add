"""What a call costs, from the per-tier prices in configuration."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.config import ModelConfig, TierConfig

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0  # after the last cache breakpoint: neither read from nor written to the cache
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The part of the cache writes that lives an hour, when the API says (usage.cache_creation);
    # None when it does not, and the writes then lived as long as the tier asked (its cache_ttl).
    cache_creation_1h_input_tokens: int | None = None

    @property
    def billed_input_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    @property
    def rate_limited_input_tokens(self) -> int:
        """What the call took from the input-tokens-per-minute limit: the API counts uncached input
        and cache writes, not cache reads."""
        return self.input_tokens + self.cache_creation_input_tokens


def call_cost(tier: TierConfig, usage: Usage, *, config: ModelConfig, batch: bool = False) -> Decimal:
    """USD for one call. Cache writes and reads are priced as multiples of the input price: a write
    at its lifetime's multiplier (the usage's own breakdown, or else the tier's cache_ttl). A call
    made in a message batch (``batch``, economy mode) costs the batch multiplier of all that: the
    discounts stack, so a cache read there costs cache_read_multiplier x batch_multiplier of input."""
    per_in = tier.input_per_mtok / MILLION
    per_out = tier.output_per_mtok / MILLION
    if usage.cache_creation_1h_input_tokens is None:
        writes = usage.cache_creation_input_tokens * config.cache_write_multiplier_for(tier.cache_ttl)
    else:
        hour = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
        writes = (hour * config.cache_write_1h_multiplier
                  + (usage.cache_creation_input_tokens - hour) * config.cache_write_multiplier)
    full = (
        usage.input_tokens * per_in
        + writes * per_in
        + usage.cache_read_input_tokens * per_in * config.cache_read_multiplier
        + usage.output_tokens * per_out
    )
    return full * config.batch_multiplier if batch else full
