"""How the CLI's tables fit a terminal: one way to write a figure, and columns that never cut one.

``compact`` writes every count, token count, amount of money and duration a table shows in a
few characters (``1.15M``, ``$0.18``, ``$2.35k``, ``4.02 s``, ``1h 05m``): six at most for a count,
seven for money from a cent up, so that a table of them fits 80 columns. ``--json`` keeps the
exact values.

``new_table`` makes the columns of figures (numbers, ids, timestamps) unwrappable, and every
other column text that folds onto more lines. When a table is wider than the terminal, rich
shrinks only the columns that may wrap, so the text gives up the room and a figure is never cut
short with "…". (Rich cuts every column evenly only when the figures alone are too wide: each
table's default columns are chosen so that they are not, at 80 columns.)"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from rich.table import Table
from rich.text import TextType

if TYPE_CHECKING:
    from pipeline.flow.economy import Saving
    from pipeline.queries.report import Summary

Unit = Literal["count", "usd", "ms", "s", "pct"]

_SUFFIXES = ("", "k", "M", "B", "T")


def _three_digits(value: float, first: int) -> str:
    """``value`` with three significant digits and a thousands suffix, from ``_SUFFIXES[first]`` up."""
    for i in range(first, len(_SUFFIXES)):
        scaled = value / 1000**i
        # Rounded first: 999,999 is "1.00M", not "1000k".
        digits = 2 if scaled < 9.995 else 1 if scaled < 99.95 else 0
        if round(scaled, digits) < 1000 or i == len(_SUFFIXES) - 1:
            return f"{scaled:.{digits}f}{_SUFFIXES[i]}"
    raise AssertionError("unreachable")


def _usd(value: Decimal) -> str:
    amount = abs(value)
    sign = "-" if value < 0 else ""
    if amount == 0:
        return "$0.00"
    if amount < Decimal("0.1"):
        # Two significant digits, as far down as they go: one job's cost is often a fraction of a
        # cent, and "$0.00" would say it was free. (Rounded twice: 0.00996 is 0.010, not 0.0100.)
        small = amount.quantize(Decimal(1).scaleb(amount.adjusted() - 1))
        small = small.quantize(Decimal(1).scaleb(small.adjusted() - 1))
        if small < Decimal("0.1"):
            return f"{sign}${small:f}"
    if amount.quantize(Decimal("0.01")) < 1000:
        return f"{sign}${amount:,.2f}"
    return f"{sign}${_three_digits(float(amount), 1)}"


def _duration(seconds: float) -> str:
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f} ms"
    if round(seconds, 1) < 60:
        return f"{seconds:.2f} s" if round(seconds, 2) < 10 else f"{seconds:.1f} s"
    if round(seconds) < 3600:
        minutes, secs = divmod(round(seconds), 60)
        return f"{minutes}m {secs:02d}s"
    if round(seconds / 60) < 24 * 60:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days}d {hours:02d}h"


def compact(value: int | float | Decimal | None, unit: Unit = "count") -> str:
    """A figure as a table shows it; ``-`` for none.

    - ``count`` (jobs, calls, tokens): exact below 10,000 (``9,876``), then three significant
      digits (``12.5k``, ``1.15M``, ``2.30B``).
    - ``usd``: cents from $0.10 to $1,000 (``$0.18``, ``$67.00``), then three digits (``$2.35k``);
      under $0.10, two significant digits (``$0.039``, ``$0.0042``).
    - ``ms`` and ``s`` (the value's unit): ``850 ms``, ``4.02 s``, ``12.5 s``, ``5m 03s``,
      ``2h 05m``, ``3d 04h``.
    - ``pct`` (a ratio): ``12.5%``.
    """
    if value is None:
        return "-"
    if unit == "usd":
        return _usd(value if isinstance(value, Decimal) else Decimal(str(value)))
    if unit in ("ms", "s"):
        seconds = float(value) / (1000 if unit == "ms" else 1)
        return ("-" if seconds < 0 else "") + _duration(abs(seconds))
    if unit == "pct":
        return f"{float(value):.1%}"
    n = float(value)
    if abs(n) < 10_000:
        return f"{round(n):,}"
    return ("-" if n < 0 else "") + _three_digits(abs(n), 1)


def when(value: datetime | None, *, seconds: bool = True) -> str:
    """A timestamp as the tables show it (UTC, as stored)."""
    if value is None:
        return "-"
    return value.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def new_table(columns: Iterable[str], *, figures: Collection[str] = (), whole: Collection[str] = (),
              title: TextType | None = None, styles: Mapping[str, str] | None = None) -> Table:
    """A table of ``columns``. Those in ``figures`` hold numbers: right-aligned, kept whole. Those
    in ``whole`` (timestamps, request ids) are kept whole too, left-aligned. Every other column is
    text that folds onto more lines to fit the room left."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        style = (styles or {}).get(col, "")
        if col in figures or col in whole:
            table.add_column(col, justify="right" if col in figures else "left", no_wrap=True, style=style)
        else:
            table.add_column(col, overflow="fold", style=style)
    return table


def economy_line(saved: Saving) -> str | None:
    """What economy mode saved, under the same table (None when no call went through a message batch)."""
    if not saved.calls:
        return None
    return (f"economy mode: {saved.calls:,} call(s) through message batches cost {compact(saved.cost_usd, 'usd')}, "
            f"against {compact(saved.standard_cost_usd, 'usd')} at the standard price: saved "
            f"{compact(saved.saved_usd, 'usd')}")


def cost_line(summary: Summary) -> str:
    """What routing saved, under the per-tier table of `stats` and of the demo."""
    return (f"cost: {compact(summary.cost_usd, 'usd')} routed, against {compact(summary.top_tier_cost_usd, 'usd')} "
            f"sending every job to {summary.top_tier}: saved {compact(summary.saving, 'usd')} "
            f"({summary.saving_ratio:.0%})")
