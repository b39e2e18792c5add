"""`python -m bench [BENCHMARK ...] [--quick]`: run the benchmarks, print one table, write JSON."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from rich.console import Console

from bench import report
from bench.report import Figure


def _benchmarks() -> dict[str, Callable[..., list[Figure]]]:
    from bench import (
        budgets,
        caching,
        economy,
        enqueue,
        fairness,
        history,
        inflight,
        overhead,
        quality,
        ratelimit,
        rollups,
        sdkcall,
    )

    return {"overhead": overhead.run, "sdk": sdkcall.run, "inflight": inflight.run, "ratelimit": ratelimit.run,
            "enqueue": enqueue.run, "history": history.run, "rollups": rollups.run, "caching": caching.run,
            "quality": quality.run, "fairness": fairness.run, "budgets": budgets.run, "economy": economy.run}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    benchmarks = _benchmarks()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*benchmarks, []], metavar="BENCHMARK",
                        help=f"which to run (default: all): {', '.join(benchmarks)}")
    parser.add_argument("--quick", action="store_true", help="the small size: all twelve in about 7 minutes")
    parser.add_argument("--profile", action="store_true",
                        help="attach py-spy to the processes measured (bench/results/profiles/)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    # Wide enough for the table when the output is not a terminal (make bench | tee ...). With
    # --json, stdout is the JSON alone: progress goes to stderr.
    console = Console(width=150, stderr=args.json)
    figures: list[Figure] = []
    took: dict[str, float] = {}
    for name in args.names or list(benchmarks):
        t0 = time.monotonic()
        figures += benchmarks[name](quick=args.quick, console=console, profile=args.profile)
        took[name] = time.monotonic() - t0
        console.print(f"[dim]{name}: {took[name]:.0f} s[/]")
    if args.json:
        import json

        print(json.dumps([f.to_json() for f in figures], indent=2, default=str))
    else:
        console.print(report.table(figures))
        console.print("took: " + ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
                      + f"; in all {sum(took.values()) / 60:.1f} min")
    report.write_results(figures, args=argv, console=Console(stderr=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
