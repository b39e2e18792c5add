"""What Celery's task events cost: the overhead benchmark's switchyard side (a batch of classify
jobs through the four workers and the dispatcher, fake Claude at zero latency), with
SWITCHYARD_TASK_EVENTS off and on in turn, on one scratch database and fake.

    .venv/bin/python -m bench.events [--jobs N] [--rounds R]

Prints, per run and as medians, jobs/s and the workers' CPU ms per job. No monitor listens, so
this is what the workers pay to send the events; Flower's own CPU comes on top, in its process.
Not part of `make bench`."""

from __future__ import annotations

import argparse
import statistics

from rich.console import Console

from bench import env
from bench.overhead import Run, measure_switchyard

console = Console(width=150)


def worker_cpu_ms(run: Run) -> float:
    return 1000 * sum(v for k, v in run.cpu.items() if k.startswith("worker-")) / run.jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs with events off and on, in turn (default 2)")
    parser.add_argument("--concurrency", type=int, default=16, help="threads per worker (default 16)")
    args = parser.parse_args(argv)
    runs: dict[str, list[Run]] = {"off": [], "on": []}
    broker = env.broker_url()
    with env.workdir() as wd, \
            env.Processes(env.switchyard_env(database_url="", broker=broker, claude_url=""), workdir=wd) as procs:
        fake = env.start_fake(procs, latency_ms=0)
        for r in range(args.rounds):
            for events in ("off", "on"):
                env.broker_url()  # an empty broker, and an empty database, for each run
                with env.scratch_database() as db:
                    run = measure_switchyard(db, broker, fake, procs.workdir, n=args.jobs,
                                             concurrency=args.concurrency, console=console,
                                             extra_env={"SWITCHYARD_TASK_EVENTS": str(events == "on")})
                runs[events].append(run)
                console.print(f"round {r + 1}, events {events}: {run.rate:.1f} jobs/s, workers "
                              f"{worker_cpu_ms(run):.1f} CPU ms per job ({run.ok}/{run.jobs} succeeded)")
    for events, done in runs.items():
        console.print(f"events {events}: median {statistics.median(r.rate for r in done):.1f} jobs/s, "
                      f"workers {statistics.median(worker_cpu_ms(r) for r in done):.1f} CPU ms per job")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
