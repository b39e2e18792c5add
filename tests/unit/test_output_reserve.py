"""What a call reserves of its tier's output budget: max_tokens, or the mean of the recent answers."""

from __future__ import annotations

import pytest

from pipeline.claude.ratelimit import OutputReserve
from pipeline.errors import ConfigError


def test_max_tokens_mode_always_reserves_the_worst_case() -> None:
    reserve = OutputReserve("max_tokens")
    for _ in range(50):
        reserve.observe("opus", 40)
    assert reserve.expect("opus", 2048) == 2048


def test_observed_mode_reserves_the_mean_recent_answer_once_warm() -> None:
    reserve = OutputReserve("observed", keep=5, warm=3)
    reserve.observe("opus", 40)
    reserve.observe("opus", 70)
    assert reserve.expect("opus", 2048) == 2048  # not warm yet: the worst case
    reserve.observe("opus", 55)
    assert reserve.expect("opus", 2048) == 55  # (40 + 70 + 55) / 3
    reserve.observe("opus", 56)
    assert reserve.expect("opus", 2048) == 56  # 221 / 4 = 55.25, rounded up
    assert reserve.expect("opus", 50) == 50  # never above max_tokens
    assert reserve.expect("sonnet", 2048) == 2048  # per tier
    for _ in range(5):  # the older answers fall out of the last five
        reserve.observe("opus", 30)
    assert reserve.expect("opus", 2048) == 30


def test_an_unknown_mode_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match="SWITCHYARD_RATE_OUTPUT_RESERVE: 'all' is not one of max_tokens, observed"):
        OutputReserve("all")
