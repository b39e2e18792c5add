"""`python -m bench [BENCHMARK ...] [--quick]`: run the benchmarks, print one table, write JSON."""

from __future__ import annotations

import argparse
import io
import signal
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


# The quick size runs these side by side, each with its own processes, database and broker: its
# five minutes need it (alone, one after another, they took 3.8 of 6). Their figures are dollars,
# tokens, answers and budget shares, which do not depend on the CPU they get, and the rate-limit
# shares, which depend on it only if the machine is too busy to send a dozen requests a second;
# the rate-limit benchmark mostly waits on its limits and latency. A quick run says that every
# figure is produced and roughly where it lands; the full size, which the README quotes, runs
# every benchmark alone.
BESIDE = ("ratelimit", "caching", "quality", "budgets", "economy")
# ...with the others' processes niced, so that the rate-limit benchmark's (and its fake's, whose
# buckets count by the clock) run when they need to: without, the fake read requests late in
# bunches while the others' workers started, and its buckets answered 429 to 15% of them. Budgets
# (mostly waiting, on a worker it kills and restarts) and quality (five runs one after another)
# take longest: they come next, so that the others fill in around them.
NICE = {"budgets": 5, "quality": 5, "caching": 10, "economy": 10}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # SIGTERM unwinds like Ctrl-C: each benchmark's context managers stop the workers, dispatchers
    # and fakes it started and drop its scratch databases, which a plain exit would leave running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    benchmarks = _benchmarks()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*benchmarks, []], metavar="BENCHMARK",
                        help=f"which to run (default: all): {', '.join(benchmarks)}")
    parser.add_argument("--quick", action="store_true",
                        help=f"the small size, with {', '.join(BESIDE)} side by side: all twelve in about 4 minutes")
    parser.add_argument("--profile", action="store_true",
                        help="attach py-spy to the processes measured (bench/results/profiles/)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    # Wide enough for the table when the output is not a terminal (make bench | tee ...). With
    # --json, stdout is the JSON alone: progress goes to stderr.
    console = Console(width=150, stderr=args.json)
    names = args.names or list(benchmarks)
    beside = [n for n in names if n in BESIDE] if args.quick else []
    by_name: dict[str, list[Figure]] = {}
    took: dict[str, float] = {}
    started = time.monotonic()
    for name in names:
        if name in beside:
            continue
        t0 = time.monotonic()
        by_name[name] = benchmarks[name](quick=args.quick, console=console, profile=args.profile)
        took[name] = time.monotonic() - t0
        console.print(f"[dim]{name}: {took[name]:.0f} s[/]")
    if beside:
        by_name |= _side_by_side(beside, benchmarks, console, took, profile=args.profile)
    figures = [f for name in names for f in by_name[name]]  # in the order asked, however they ended
    if args.json:
        import json

        print(json.dumps([f.to_json() for f in figures], indent=2, default=str))
    else:
        console.print(report.table(figures))
        console.print("took: " + ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
                      + f"; in all {(time.monotonic() - started) / 60:.1f} min")
    report.write_results(figures, args=argv, console=Console(stderr=True))
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _side_by_side(names: list[str], benchmarks: dict[str, Callable[..., list[Figure]]], console: Console,
                  took: dict[str, float], *, profile: bool) -> dict[str, list[Figure]]:
    """The quick size's untimed benchmarks at once. Each writes to a console of its own, printed
    whole when it ends, so that their lines do not interleave; a status line shows which still run."""
    from bench import env

    outputs = {name: Console(file=io.StringIO(), width=console.width) for name in names}  # plain text

    def runner(name: str) -> Callable[[], list[Figure]]:
        return lambda: benchmarks[name](quick=True, console=outputs[name], profile=profile)

    out: dict[str, list[Figure]] = {}
    running = list(names)
    # Said once, for a log (make bench | tee): the status line below shows only on a terminal.
    console.print(f"[bold]side by side[/]: {', '.join(names)}; each one's output follows when it ends")
    with console.status(f"side by side: {', '.join(running)}") as status:
        for name, figures, seconds in env.side_by_side({n: runner(n) for n in names}, nice=NICE):
            out[name], took[name] = figures, seconds
            running.remove(name)
            console.out(outputs[name].file.getvalue(), end="", highlight=False)  # type: ignore[attr-defined]
            console.print(f"[dim]{name}: {seconds:.0f} s (side by side)[/]")
            status.update(f"side by side: {', '.join(running)}")
    return out


if __name__ == "__main__":
    sys.exit(main())
