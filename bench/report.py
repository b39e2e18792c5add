"""Figures, the one table printed at the end, and the JSON written to bench/results/."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Figure:
    """One measured figure against its baseline. ``higher_is_better`` decides how the target reads:
    the ratio must reach ``target`` (a floor) or stay under it (a ceiling)."""

    benchmark: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: float | None = None
    # "ratio>=" (value/baseline at least target), "<=" (value at most target), "ratio<=".
    target_kind: str = "ratio>="
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        if self.target_kind == "ratio>=":
            return self.ratio is not None and self.ratio >= self.target
        if self.target_kind == "ratio<=":
            return self.ratio is not None and self.ratio <= self.target
        if self.target_kind == "<=":
            return self.value <= self.target
        if self.target_kind == "<":
            return self.value < self.target
        if self.target_kind == ">=":
            return self.value >= self.target
        raise ValueError(self.target_kind)

    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.target_kind == ">=" and not self.unit:
            return "yes"
        kind = {"ratio>=": "ratio ≥", "ratio<=": "ratio ≤", "<=": "≤", "<": "<", ">=": "≥"}[self.target_kind]
        return f"{kind} {self.target:g}{'' if kind.startswith('ratio') else ' ' + self.unit}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["passed"] = self.passed
        return d


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return f"{s} {unit}".strip()


def table(figures: list[Figure], *, title: str = "switchyard benchmarks") -> Table:
    t = Table(title=title)
    for col in ("benchmark", "figure", "switchyard", "baseline", "ratio", "target", "result"):
        t.add_column(col, justify="left" if col in ("benchmark", "figure", "target") else "right")
    for f in figures:
        result = {True: "[green]pass", False: "[red]FAIL", None: ""}[f.passed]
        baseline = f"{_num(f.baseline, f.unit)}" + (f" ({f.baseline_name})" if f.baseline_name else "")
        t.add_row(f.benchmark, f.name, _num(f.value, f.unit), baseline if f.baseline is not None else "—",
                  _num(f.ratio), f.target_text(), result)
    return t


def markdown(figures: list[Figure]) -> str:
    """The same table in Markdown, for the README."""
    lines = ["| benchmark | figure | switchyard | baseline | ratio | target | result |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for f in figures:
        result = {True: "pass", False: "**FAIL**", None: ""}[f.passed]
        baseline = (_num(f.baseline, f.unit) + (f" ({f.baseline_name})" if f.baseline_name else "")
                    if f.baseline is not None else "—")
        lines.append(f"| {f.benchmark} | {f.name} | {_num(f.value, f.unit)} | {baseline} | {_num(f.ratio)} | "
                     f"{f.target_text()} | {result} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def write_results(figures: list[Figure], *, args: list[str], console: Console) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    doc = {"at": stamp, "args": args, "machine": machine(), "figures": [f.to_json() for f in figures],
           "markdown": markdown(figures)}
    path = RESULTS_DIR / f"bench-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    (RESULTS_DIR / "latest.json").write_text(json.dumps(doc, indent=2, default=str))
    console.print(f"results written to {path}")
    return path


if __name__ == "__main__":
    # `python -m bench.report [FILE]`: a run's table in Markdown, with the machine (for the README).
    # The latest run by default; a partial run (one benchmark, --quick) is the latest too, so the
    # full run a README quotes can be named by its file.
    import sys

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "latest.json"
    try:
        run = json.loads(path.read_text())
        m = run["machine"]
        table = run["markdown"]
    except FileNotFoundError:
        sys.exit(f"bench.report: no results at {path}: run `make bench` first")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"bench.report: {path} is not a results file written by `make bench` ({exc})")
    print(table)
    print(f"\n{m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}, run {run['at']}")
