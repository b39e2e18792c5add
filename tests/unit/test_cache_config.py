"""Prompt caching as configuration: each tier's minimum cacheable prompt, its cache TTL and whether its
model takes structured outputs; and what cache tokens cost at the configured multipliers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import parse_config
from pipeline.errors import ConfigError

M = Decimal(1_000_000)


def raw(**tier: Any) -> dict[str, Any]:
    """Three tiers at $2 / $10 per million; ``tier`` adds keys to Sonnet's table."""
    tiers = {n: {"model": f"claude-{n}-9", "input_per_mtok": 2, "output_per_mtok": 10} for n in ("haiku", "sonnet",
                                                                                               "opus")}
    tiers["sonnet"].update(tier)
    return {"tiers": tiers}


def test_the_defaults_give_each_tier_its_documented_minimum_a_ttl_and_structured_outputs() -> None:
    from pipeline.config import load_config

    config = load_config()
    assert {n: config.tier(n).cache_min_tokens for n in config.tiers} == {"haiku": 4096, "sonnet": 1024,
                                                                         "opus": 4096}
    assert {config.tier(n).cache_ttl for n in config.tiers} == {"5m"}
    assert all(config.tier(n).structured_outputs for n in config.tiers)
    assert (config.cache_write_multiplier, config.cache_write_1h_multiplier, config.cache_read_multiplier) == (
        Decimal("1.25"), Decimal("2"), Decimal("0.10"))


def test_caching_is_on_unless_the_configuration_turns_it_off() -> None:
    from pipeline.config import load_config

    assert load_config().caching  # defaults.toml says so
    assert parse_config(raw()).caching  # and a file written before [caching] existed is cached too
    assert parse_config({**raw(), "caching": {}}).caching
    assert not parse_config({**raw(), "caching": {"enabled": False}}).caching
    assert parse_config({**raw(), "caching": {"enabled": True}}).caching


def test_a_tier_table_without_the_cache_keys_gets_safe_values() -> None:
    # An operator's copy written before these keys existed still loads: the largest documented
    # minimum (a breakpoint below the model's minimum would be ignored anyway), the 5-minute TTL, and no
    # structured outputs (a model that lacks them would refuse every call that asked).
    sonnet = parse_config(raw()).tier("sonnet")
    assert (sonnet.cache_min_tokens, sonnet.cache_ttl, sonnet.structured_outputs) == (4096, "5m", False)
    sonnet = parse_config(raw(cache_min_tokens=2048, cache_ttl="1h", structured_outputs=True)).tier("sonnet")
    assert (sonnet.cache_min_tokens, sonnet.cache_ttl, sonnet.structured_outputs) == (2048, "1h", True)


@pytest.mark.parametrize(("config", "message"), [
    (raw(cache_min_tokens=0), "[tiers.sonnet]: 'cache_min_tokens' must be a whole number of tokens, at least 1, not 0"),
    (raw(cache_min_tokens="1024"), "'cache_min_tokens' must be a whole number of tokens, at least 1, not '1024'"),
    (raw(cache_min_tokens=1024.5), "'cache_min_tokens' must be a whole number"),
    (raw(cache_min_tokens=True), "'cache_min_tokens' must be a whole number"),
    (raw(cache_ttl="10m"), "[tiers.sonnet]: 'cache_ttl' must be \"5m\" or \"1h\", not '10m'"),
    (raw(cache_ttl=5), "'cache_ttl' must be \"5m\" or \"1h\", not 5"),
    (raw(structured_outputs="yes"), "[tiers.sonnet]: 'structured_outputs' must be true or false, not 'yes'"),
    ({**raw(), "pricing": {"cache_write_1h_multiplier": "double"}},
     "[pricing]: 'cache_write_1h_multiplier' must be a number, not 'double'"),
    ({**raw(), "pricing": {"cache_read_multiplier": -0.1}}, "[pricing]: 'cache_read_multiplier' must not be negative"),
    ({**raw(), "pricing": {"cache_write_multiplier": [1]}}, "'cache_write_multiplier' must be a number"),
    ({**raw(), "caching": {"enabled": "no"}}, "[caching]: 'enabled' must be true or false, not 'no'"),
    ({**raw(), "caching": {"enabled": 0}}, "[caching]: 'enabled' must be true or false, not 0"),
    ({**raw(), "caching": {"enable": False}}, "[caching]: unknown key 'enable' (expected enabled)"),
    ({**raw(), "caching": True}, "[caching] must be a table, not True"),
])
def test_a_bad_cache_setting_is_one_sentence_naming_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config, source="models.toml")
    text = str(info.value)
    assert message in text and text.startswith("models.toml") and "\n" not in text


def test_cache_tokens_cost_their_multiple_of_the_input_price() -> None:
    config = parse_config(raw())
    sonnet = config.tier("sonnet")  # $2 in, $10 out; 5-minute TTL
    # Plain input, 5-minute writes at 1.25x, reads at 0.1x, output.
    usage = Usage(1000, 500, cache_creation_input_tokens=2000, cache_read_input_tokens=40_000)
    assert call_cost(sonnet, usage, config=config) == (1000 * 2 + Decimal(2000) * 2 * Decimal("1.25")
                                                       + Decimal(40_000) * 2 * Decimal("0.10") + 500 * 10) / M
    # A tier that caches for an hour pays 2x for its writes when the usage does not break them down.
    hour = parse_config(raw(cache_ttl="1h"))
    assert call_cost(hour.tier("sonnet"), usage, config=hour) == (1000 * 2 + 2000 * 2 * 2 + Decimal(40_000) * 2
                                                                  * Decimal("0.10") + 500 * 10) / M
    # When it does (usage.cache_creation), each part is priced at its own TTL's multiplier,
    # whatever the tier asked for.
    split = Usage(1000, 500, cache_creation_input_tokens=2000, cache_read_input_tokens=40_000,
                  cache_creation_1h_input_tokens=1500)
    expected = (1000 * 2 + Decimal(500) * 2 * Decimal("1.25") + 1500 * 2 * 2 + Decimal(40_000) * 2 * Decimal("0.10")
                + 500 * 10) / M
    assert call_cost(sonnet, split, config=config) == expected
    assert call_cost(hour.tier("sonnet"), split, config=hour) == expected
    # The multipliers are configuration too.
    custom = parse_config({**raw(), "pricing": {"cache_write_multiplier": 1.5, "cache_write_1h_multiplier": 3,
                                                "cache_read_multiplier": 0.05}})
    assert call_cost(custom.tier("sonnet"), split, config=custom) == (
        1000 * 2 + Decimal(500) * 2 * Decimal("1.5") + 1500 * 2 * 3 + Decimal(40_000) * 2 * Decimal("0.05")
        + 500 * 10) / M

