"""pipeline.cli.tables.compact: the one way a table writes a count, an amount of money or a duration."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.cli.tables import Unit, compact


@pytest.mark.parametrize(("value", "unit", "shown"), [
    (None, "count", "-"),
    (0, "count", "0"),
    (9_999, "count", "9,999"),          # exact while it fits five characters
    (10_000, "count", "10.0k"),
    (151_234, "count", "151k"),
    (999_499, "count", "999k"),
    (999_500, "count", "1.00M"),        # rounds up into the next unit, never "1000k"
    (1_151_234, "count", "1.15M"),
    (1_151_234_567, "count", "1.15B"),
    (-12_345, "count", "-12.3k"),
    (Decimal(0), "usd", "$0.00"),
    (Decimal("0.0000323"), "usd", "$0.000032"),  # a fraction of a cent is not free
    (Decimal("0.00126"), "usd", "$0.0013"),
    (Decimal("0.00996"), "usd", "$0.010"),
    (Decimal("0.0389"), "usd", "$0.039"),      # two digits where cents would say $0.04
    (Decimal("0.0999"), "usd", "$0.10"),
    (Decimal("0.184"), "usd", "$0.18"),
    (Decimal("67"), "usd", "$67.00"),
    (Decimal("999.994"), "usd", "$999.99"),
    (Decimal("999.995"), "usd", "$1.00k"),
    (Decimal("2268.40375"), "usd", "$2.27k"),
    (Decimal("1234567.8"), "usd", "$1.23M"),
    (Decimal("-2230.5"), "usd", "-$2.23k"),
    (0.4, "ms", "0 ms"),
    (999.4, "ms", "999 ms"),
    (999.6, "ms", "1.00 s"),
    (4_020, "ms", "4.02 s"),
    (12_500, "ms", "12.5 s"),
    (59_960, "ms", "1m 00s"),
    (303, "s", "5m 03s"),
    (3_723, "s", "1h 02m"),
    (93_784, "s", "1d 02h"),
    (None, "ms", "-"),
    (0.125, "pct", "12.5%"),
])
def test_compact(value: int | float | Decimal | None, unit: Unit, shown: str) -> None:
    assert compact(value, unit) == shown


def test_compact_figures_stay_short() -> None:
    """Six characters at most for a count, seven for money from a cent up, eight for a duration
    under a thousand days: what the tables' column budgets are built on."""
    for exponent in range(16):
        for mantissa in (1, 4.9999, 9.9951, 9.99949):
            n = mantissa * 10**exponent
            assert len(compact(round(n))) <= 6, n
            assert len(compact(Decimal(n) / 100 + Decimal("0.01"), "usd")) <= 7, n
            if n < 8.6e10:
                assert len(compact(n, "ms")) <= 8, n
