"""Benchmark 2: calls in flight under realistic model latency.

At each worker concurrency C the fake Claude answers after L = C / 40 s, so the ideal throughput
C / L is 40 jobs/s whatever C (well under the orchestration limit of benchmark 1). The jobs are
pinned to one work tier, so each makes exactly one model call (work) and one deterministic
validation: the tier's C threads are the only thing between the jobs and the fake. Figures, each
against the ideal: the mean number of calls in flight at the fake (sampled from its own counter)
against C through the middle half of the run, where a finite batch is neither ramping up nor
finishing its last partial wave (with a variable latency, the run as it would be if the last call
to start took the median latency: see `Sampled.window`); the steady throughput, over whole waves
with a fixed latency (`Sampled.wave_rate`: a time window would count five waves or six), through
the same middle half with a variable one; and, for the record, the throughput from the start of
the enqueue to the last job (2,000 jobs at C = 500 are only four waves, so the edges weigh). And
the work tier's worker memory: its growth from idle to the peak of the run, per call in flight.
Where a figure falls short, the run says how: the seconds the calls in flight spent under 0.9 C
and in how many dips (a few dips one latency apart are wave boundaries; a shortfall all along is a
worker that cannot hold C calls), the cores each process used, and the run in 5 s bins.

Baseline, in the same run: the plain script a user would write instead, a ThreadPoolExecutor of C
threads calling the SDK against the same fake.

Past 200 threads `switchyard worker` splits itself into processes (pipeline/cli/workergroup.py):
the figures at C = 500 and 2,000 are of that group, memory and CPU summed over its processes; the
same C = 500 as one process (`--processes 1`) is measured beside it, as the before. And a run with
a variable latency: log-normal, median C/40 s, p99 five times the median; its ideal is C over the
mean latency (the median times exp(sigma^2 / 2)).
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path

import anthropic
from rich.console import Console
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench import env
from bench.jobs import classify_jobs, write_jsonl
from bench.profile import CpuMeter, cpu_seconds, postgres_pids
from bench.report import Figure
from pipeline.cli.workergroup import processes_for
from pipeline.db import make_engine, session_factory
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, ModelCall
from pipeline.queries.report import terminal_count
from pipeline.settings import Settings

NAME = "in-flight"
IDEAL_RATE = 40.0  # jobs/s: C / L with L = C / 40
TIER = "sonnet"
# Log-normal latency with the p99 five times the median: exp(2.326 * sigma) = 5.
SIGMA_P99_5X = math.log(5) / 2.326


@dataclass
class Sampled:
    seconds: float
    jobs: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time since start, in flight)
    max_in_flight: int = 0
    rss_idle_kib: int = 0
    rss_peak_kib: int = 0
    ok: int = 0

    finished: list[float] = field(default_factory=list)  # seconds since start at which each job ended
    # CPU seconds the work tier's worker processes used over the run, and how many there were: a
    # process near one CPU-second per second is bound by its GIL, whatever its thread count.
    worker_cpu_s: float = 0.0
    worker_processes: int = 0
    # When the last job began its first call (seconds since start), and the latency's median:
    # `window` ends the steady part where the batch had no job left to start.
    last_start: float | None = None
    median_latency: float = 0.0
    fixed_latency: bool = True
    # CPU seconds over the run of every process taking part (the fake, each switchyard process,
    # Postgres, this bench process): where the two cores went while calls in flight fell short;
    # and the same read through the run, (time since start, CPU seconds so far by process).
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def window(self) -> tuple[float, float]:
        """The middle half of the run as it would be if the last call to start took the median
        latency. With a fixed latency that is the run itself (its last call ends L after it
        starts). With a log-normal one the last calls to start take up to several times the
        median, and a batch of a few waves ends in a drain as long as its start: nothing is left
        to start, so calls in flight fall whatever the workers can hold. That drain is the
        batch's tail, not the workers, and the window leaves it out."""
        end = self.seconds if self.last_start is None else min(self.seconds, self.last_start + self.median_latency)
        return end * 0.25, end * 0.75

    def worker_busy(self) -> float:
        """Share of the run each work worker process spent on a CPU (1.0: one core, all the time)."""
        return self.worker_cpu_s / (self.seconds * self.worker_processes) if self.worker_processes else 0.0

    @property
    def rate(self) -> float:
        """End to end: every job, from the start of the enqueue to the last one terminal."""
        return self.jobs / self.seconds

    def steady_rate(self) -> float:
        """Jobs finished per second through the middle half of the run, where the in-flight mean is
        taken too: what the workers sustain, without the ramp-up and the last partial wave."""
        lo, hi = self.window()
        return sum(1 for t in self.finished if lo <= t < hi) / (hi - lo)

    def wave_rate(self, c: int) -> float:
        """With a fixed latency, jobs a second over whole waves: from the middle of the first wave
        of finishes (the job ranked C/2) to the middle of the last whole wave after it (C/2 + mC).

        A fixed latency makes the jobs finish in waves, C at a time, one latency apart, so a
        time window counts whole waves: at C = 200 (L = 5 s) the middle half of a 54 s run holds
        five waves or six, and reads 37 jobs/s or 44 for the same workers. Between two ranks a
        whole number of waves apart, m waves of C jobs take exactly m cycles of a worker thread
        (its call and whatever switchyard adds between calls), which is the rate the ideal is
        measured against. A variable latency has no waves: ``steady_rate``."""
        if not self.fixed_latency:
            return self.steady_rate()
        ends = sorted(self.finished)
        first = c // 2
        waves = (len(ends) - 1 - first) // c
        if waves < 1 or ends[first + waves * c] <= ends[first]:
            return self.steady_rate()
        return waves * c / (ends[first + waves * c] - ends[first])

    def mean_in_flight(self) -> float:
        """Mean over the middle half of the run: the ramp-up and the last partial wave are not
        what the workers can hold, they are what any finite batch looks like at its edges."""
        lo, hi = self.window()
        window = [n for t, n in self.samples if lo <= t <= hi]
        return sum(window) / len(window) if window else 0.0

    def dips(self, c: int, below: float = 0.9) -> tuple[float, int, float]:
        """Where the window's calls in flight fell short: the seconds spent under ``below`` x C,
        in how many separate dips, and the longest. A shortfall in a few dips one latency apart is
        the batch's wave boundaries (every call of a wave ends together, and its jobs must be
        finished and the next ones started before the calls are back); a shortfall spread over
        the whole window is a worker that cannot hold C calls at all."""
        lo, hi = self.window()
        under, count, longest, run = 0.0, 0, 0.0, 0.0
        timed = [(t, n) for t, n in self.samples if lo <= t <= hi]
        for (t, n), (t_next, _) in pairwise(timed):
            if n < below * c:
                if run == 0.0:
                    count += 1
                run += t_next - t
                under += t_next - t
                longest = max(longest, run)
            else:
                run = 0.0
        return under, count, longest

    def series(self, step: float = 5.0) -> list[tuple[float, float, int, dict[str, float]]]:
        """The run in ``step``-second bins: (bin start, mean calls in flight, jobs finished, cores
        each process used). A process near 1.0 in a bin where the calls fell short was the
        bottleneck there: each is one Python process, one GIL."""
        bins: dict[int, list[int]] = {}
        for t, n in self.samples:
            bins.setdefault(int(t // step), []).append(n)
        done: dict[int, int] = {}
        for t in self.finished:
            done[int(t // step)] = done.get(int(t // step), 0) + 1
        # The last CPU reading in each bin, and the cores used since the previous bin's.
        last: dict[int, tuple[float, dict[str, float]]] = {}
        for t, used in self.cpu_samples:
            last[int(t // step)] = (t, used)
        cores: dict[int, dict[str, float]] = {}
        previous = self.cpu_samples[0] if self.cpu_samples else None
        for k in sorted(last):
            t, used = last[k]
            if previous is not None and t > previous[0]:
                cores[k] = {name: round((used[name] - previous[1].get(name, 0.0)) / (t - previous[0]), 2)
                            for name in used}
            previous = last[k]
        return [(k * step, round(sum(v) / len(v), 1) if (v := bins.get(k)) else 0.0, done.get(k, 0),
                 cores.get(k, {})) for k in range(max([*bins, *done], default=-1) + 1)]


class Sampler(threading.Thread):
    """Reads the fake's in-flight counter (and a process's memory) every ``interval`` seconds,
    and every fifth time the CPU seconds so far of each group in ``cpu_groups`` (name -> pids)."""

    def __init__(self, fake: env.Fake, rss_pids: list[int], interval: float = 0.1,
                 cpu_groups: dict[str, list[int]] | None = None) -> None:
        super().__init__(daemon=True)
        self.fake, self.rss_pids, self.interval = fake, rss_pids, interval
        self.cpu_groups = cpu_groups or {}
        self.samples: list[tuple[float, int]] = []
        self.cpu_samples: list[tuple[float, dict[str, float]]] = []
        self.rss_peak = 0
        self.t0, self.wall0 = time.monotonic(), time.time()
        self.done = threading.Event()

    def run(self) -> None:
        turn = 0
        while not self.done.is_set():
            try:
                n = int(self.fake.stats()["in_flight"])
            except OSError:
                n = -1
            if n >= 0:
                self.samples.append((time.monotonic() - self.t0, n))
            if self.rss_pids:
                self.rss_peak = max(self.rss_peak, sum(env.rss_kib(p) for p in self.rss_pids))
            if self.cpu_groups and turn % 5 == 0:
                self.cpu_samples.append((time.monotonic() - self.t0, {
                    name: sum(cpu_seconds(p) for p in pids) for name, pids in self.cpu_groups.items()}))
            turn += 1
            self.done.wait(self.interval)


def measure_switchyard(c: int, n: int, db: str, broker: str, workdir: Path, console: Console, *,
                       processes: int | None = None, sigma: float = 0.0) -> Sampled:
    """The tier's worker at ``--concurrency C``: as many processes as it splits itself into, or
    ``processes`` if given. Memory and CPU are those of all its processes together."""
    latency_ms = c / 40 * 1000
    split = processes_for(c, processes)
    sessions = session_factory(make_engine(db, pool_size=2))
    settings = Settings(DATABASE_URL=db, BROKER_URL=broker)
    with env.Processes(env.switchyard_env(database_url=db, broker=broker, claude_url=""), workdir=workdir) as procs:
        fake = env.start_fake(procs, latency_ms=latency_ms, args=["--latency-sigma", str(sigma)] if sigma else None)
        e = {"ANTHROPIC_BASE_URL": fake.url}
        argv = ["worker", "--tier", TIER, "--concurrency", str(c), "--loglevel", "INFO"]
        if processes is not None:
            argv += ["--processes", str(processes)]
        worker, *_ = env.start_at_once(procs, [
            (f"worker-{TIER}", env.switchyard(*argv), f"all {split} processes ready" if split > 1 else " ready."),
            # One validate process, as before worker groups: its stage is short and not what is measured.
            ("worker-validate", env.switchyard("worker", "--tier", "validate", "--concurrency", str(min(c, 500)),
                                               "--processes", "1", "--db-connections", "16"), " ready."),
            ("dispatcher", env.switchyard("dispatcher"), "dispatcher:")], env=e, timeout=600)
        pids = [worker.pid, *env.child_pids(worker.pid)]
        # Warm up: one wave through, so the pools and threads exist before idle memory is read.
        warm = write_jsonl(workdir / f"warm-{c}.jsonl", classify_jobs(min(c, 50), tier=TIER, prefix=f"w{c}"))
        report = enqueue_file(sessions, warm, batch=f"warm-{c}-{time.time_ns()}", config=settings.models)
        # With a log-normal latency one warm-up call in fifty may take eight times the median
        # (and a call past the call timeout is sent again): wait for the far tail, not 3 L.
        tail = math.exp(4 * sigma) if sigma else 3.0
        _wait(sessions, report.batch_id, report.accepted, procs, timeout=60 + tail * latency_ms / 1000)
        rss_idle = sum(env.rss_kib(p) for p in pids)
        fake.reset()
        path = write_jsonl(workdir / f"jobs-{c}.jsonl", classify_jobs(n, tier=TIER, prefix=f"j{c}"))
        meter = _meter(procs, pids, db)
        sampler = Sampler(fake, pids, cpu_groups={name: group() for name, group in meter.groups.items()})
        meter.start()
        sampler.start()
        report = enqueue_file(sessions, path, batch=f"inflight-{c}-{time.time_ns()}", config=settings.models)
        t1 = _wait(sessions, report.batch_id, n, procs, timeout=120 + 4 * n / IDEAL_RATE)
        cpu_s = meter.stop()
        sampler.done.set()
        sampler.join()
        stats = fake.stats()
        with sessions() as s:
            ok = s.scalar(select(func.count()).where(Job.batch_id == report.batch_id,
                                                     Job.status == JobStatus.SUCCEEDED)) or 0
            ends = s.scalars(select(Job.finished_at).where(Job.batch_id == report.batch_id)).all()
            # When the last job began its first call: the fake's log would give a retry's start
            # instead (a call past the call timeout, 120 s, is cut and sent again minutes after
            # every job has started), and the window would run into the drain.
            first = (select(func.min(ModelCall.started_at).label("at")).join(Job, Job.id == ModelCall.job_id)
                     .where(Job.batch_id == report.batch_id).group_by(ModelCall.job_id).subquery())
            last_first = s.scalar(select(func.max(first.c.at)))
        last_start = last_first.timestamp() - sampler.wall0 if last_first is not None else None
    finished = [e.timestamp() - sampler.wall0 for e in ends if e is not None]
    # The parent of a split worker only waits: its CPU is counted, but it is not a process that serves.
    return Sampled(t1 - sampler.t0, n, sampler.samples, int(stats["max_in_flight"]), rss_idle,
                   sampler.rss_peak, ok, finished, worker_cpu_s=cpu_s[f"worker-{TIER}"], worker_processes=split,
                   last_start=last_start, median_latency=latency_ms / 1000, fixed_latency=not sigma, cpu_s=cpu_s,
                   cpu_samples=sampler.cpu_samples)


def _with_children(pid: int) -> list[int]:
    return [pid, *env.child_pids(pid)]


def _meter(procs: env.Processes, work_pids: list[int], db: str) -> CpuMeter:
    """Every process of a switchyard run, the work tier's group as one."""
    meter = CpuMeter()
    meter.add(f"worker-{TIER}", lambda: work_pids)
    for p in procs.procs:
        if p.name != f"worker-{TIER}":
            meter.add(p.name, partial(_with_children, p.pid))
    engine = make_engine(db, pool_size=1)
    meter.add("postgres", lambda: postgres_pids(engine, engine.url.database or ""))
    meter.add("bench (enqueue, poll)", lambda: [os.getpid()])
    # The broker, the rate limiter's buckets and the heartbeats: shared by every benchmark on the
    # machine, but nothing else runs during a measurement.
    meter.add("redis", lambda: env.pids_named("redis-server"))
    return meter


def _last_start(fake: env.Fake, wall0: float) -> float | None:
    """Seconds after ``wall0`` at which the last request the fake logged started (the plain
    script sends one request a job, and never again)."""
    starts = [float(r["started_at"]) for r in fake.requests()]
    return max(starts) - wall0 if starts else None


def _wait(sessions: sessionmaker[Session], batch_id: int | None, n: int, procs: env.Processes,
          timeout: float) -> float:
    assert batch_id is not None

    def done() -> bool:
        with sessions() as s:
            return terminal_count(s, batch_id=batch_id)[0] >= n

    return env.wait_until(done, timeout=timeout, interval=0.1, procs=procs, what=f"batch {batch_id}")


def measure_script(c: int, n: int, workdir: Path, *, sigma: float = 0.0) -> Sampled:
    """The plain script: C threads, each calling the SDK, as many calls as there are jobs."""
    latency_ms = c / 40 * 1000
    with env.Processes(env.switchyard_env(database_url="", broker="", claude_url=""), workdir=workdir) as procs:
        fake = env.start_fake(procs, latency_ms=latency_ms, args=["--latency-sigma", str(sigma)] if sigma else None)
        client = anthropic.Anthropic(api_key="bench-key", base_url=fake.url, max_retries=0,
                                     http_client=anthropic.DefaultHttpxClient(
                                         limits=anthropic.DEFAULT_CONNECTION_LIMITS.__class__(
                                             max_connections=c, max_keepalive_connections=c)))

        ends: list[float] = []

        def one(i: int) -> str:
            msg = client.messages.create(model="claude-sonnet-5-5", max_tokens=256, messages=[
                {"role": "user", "content": f"Classify ticket {i}: I was charged twice. Labels: billing, bug, other."}])
            ends.append(time.monotonic())
            return "".join(getattr(b, "text", "") for b in msg.content if b.type == "text")

        with ThreadPoolExecutor(c) as pool:
            list(pool.map(one, range(min(c, 50))))  # warm-up, as on the other side
            fake.reset()
            ends.clear()
            meter = CpuMeter()
            meter.add("fake-claude", lambda: [fake.proc.pid])
            meter.add("script (this process)", lambda: [os.getpid()])
            sampler = Sampler(fake, [os.getpid()], cpu_groups={name: group() for name, group in meter.groups.items()})
            meter.start()
            sampler.start()
            results = list(pool.map(one, range(n)))
            t1 = time.monotonic()
            cpu_s = meter.stop()
        sampler.done.set()
        sampler.join()
        stats = fake.stats()
        last_start = _last_start(fake, sampler.wall0)
        client.close()
    return Sampled(t1 - sampler.t0, n, sampler.samples, int(stats["max_in_flight"]), ok=len(results),
                   finished=[e - sampler.t0 for e in ends], last_start=last_start,
                   median_latency=latency_ms / 1000, fixed_latency=not sigma, cpu_s=cpu_s,
                   cpu_samples=sampler.cpu_samples)


def _report(console: Console, label: str, c: int, n: int, ideal: float, sy: Sampled, script: Sampled, *,
            target: float) -> list[Figure]:
    growth = max(0, sy.rss_peak_kib - sy.rss_idle_kib) / 1024
    per_call = growth / max(1, sy.max_in_flight)
    console.print(f"  script: {script.wave_rate(c):.1f} jobs/s steady ({script.steady_rate():.1f} in the time "
                  f"window), {script.rate:.1f} end to end, mean in flight {script.mean_in_flight():.0f}; switchyard "
                  f"({sy.worker_processes} work process(es)): {sy.wave_rate(c):.1f} jobs/s steady "
                  f"({sy.steady_rate():.1f} in the time window), {sy.rate:.1f} end to end, mean in flight "
                  f"{sy.mean_in_flight():.0f} (max {sy.max_in_flight}), worker RSS {sy.rss_idle_kib / 1024:.0f} -> "
                  f"{sy.rss_peak_kib / 1024:.0f} MiB, {sy.ok}/{sy.jobs} succeeded; work worker CPU "
                  f"{1000 * sy.worker_cpu_s / n:.1f} ms a job, each process on a CPU {100 * sy.worker_busy():.0f}% "
                  "of the run")
    for who, run in (("switchyard", sy), ("script", script)):
        under, count, longest = run.dips(c)
        lo, hi = run.window()
        cpu = ", ".join(f"{name} {seconds / run.seconds:.2f}" for name, seconds in
                        sorted(run.cpu_s.items(), key=lambda kv: -kv[1]))
        console.print(f"  {who}: in flight under 0.9 C for {under:.1f} s of the {hi - lo:.1f} s window, in "
                      f"{count} dip(s), the longest {longest:.1f} s; cores used by process: {cpu}")
        # Each 5 s of the window where the calls fell short, and which processes were busiest then.
        short = [(t, calls, cores) for t, calls, _, cores in run.series() if lo <= t < hi and calls < 0.9 * c]
        for t, calls, cores in short[:8]:
            busiest = ", ".join(f"{name} {v:.2f}" for name, v in sorted(cores.items(), key=lambda kv: -kv[1])[:3])
            console.print(f"    {t:5.0f} s: {calls:.0f} in flight; busiest: {busiest or '?'}")
    extra = {"C": c, "ideal_rate": ideal, "jobs": n, "succeeded": sy.ok, "seconds": sy.seconds,
             "processes": sy.worker_processes, "end_to_end_rate": sy.rate, "script_end_to_end_rate": script.rate,
             "script_steady_rate": script.wave_rate(c), "script_mean_in_flight": script.mean_in_flight(),
             "window_rate": sy.steady_rate(), "script_window_rate": script.steady_rate(),
             "max_in_flight": sy.max_in_flight, "rss_idle_mib": sy.rss_idle_kib / 1024,
             "rss_peak_mib": sy.rss_peak_kib / 1024, "worker_cpu_ms_per_job": 1000 * sy.worker_cpu_s / n,
             "worker_busy": sy.worker_busy(), "window_s": sy.window(), "script_window_s": script.window(),
             # Diagnostics of a shortfall: dips under 0.9 C (seconds, count, longest), the cores each
             # process used over the run, and the run in 5 s bins (start, mean in flight, finished).
             "dips": sy.dips(c), "script_dips": script.dips(c),
             "cores_by_process": {k: v / sy.seconds for k, v in sy.cpu_s.items()},
             "script_cores_by_process": {k: v / script.seconds for k, v in script.cpu_s.items()},
             "series": sy.series(), "script_series": script.series()}
    return [
        Figure(NAME, f"{label}: throughput (steady) vs ideal", sy.wave_rate(c), "jobs/s", baseline=ideal,
               baseline_name=f"ideal; script {script.wave_rate(c):.1f}", target=target, extra=extra),
        Figure(NAME, f"{label}: throughput, enqueue to last job", sy.rate, "jobs/s", baseline=ideal,
               baseline_name=f"ideal; script {script.rate:.1f}"),
        Figure(NAME, f"{label}: mean calls in flight vs C", sy.mean_in_flight(), "calls", baseline=float(c),
               baseline_name=f"C; script {script.mean_in_flight():.0f}", target=target),
        Figure(NAME, f"{label}: worker memory per call in flight", per_call * 1024, "KiB", target=1024,
               target_kind="<"),
    ]


def run(*, quick: bool, console: Console, profile: bool = False,
        levels: tuple[int, ...] | None = None, extras: bool = True) -> list[Figure]:
    """``levels``: the concurrencies with a steady latency (default: all of them, or 20 if quick);
    ``extras``: the one-process and log-normal runs too."""
    levels = levels or ((20,) if quick else (50, 200, 500, 2000))
    figures: list[Figure] = []
    broker = env.broker_url()
    with env.scratch_database() as db, env.workdir() as workdir:
        for c in levels:
            # At C = 2,000 (L = 50 s) 2,000 jobs would be one wave: three of them.
            n = 4 * c if quick else max(2000, 3 * c)
            split = processes_for(c, None)
            console.print(f"[bold]in-flight[/]: C={c}, L={c / 40:.2f} s, {n:,} jobs (ideal {IDEAL_RATE:.0f} jobs/s), "
                          f"{split} work process(es)")
            script = measure_script(c, n, workdir)
            sy = measure_switchyard(c, n, db, broker, workdir, console)
            figures += _report(console, f"C={c}", c, n, IDEAL_RATE, sy, script, target=0.95)
        if not quick and extras:
            # The before, in the same run: C = 500 as one process, which the worker no longer is
            # unless told (--processes 1). What limits it is its single GIL at each wave boundary.
            c = 500
            console.print(f"[bold]in-flight[/]: C={c} as one process (--processes 1)")
            one = measure_switchyard(c, 2000, db, broker, workdir, console, processes=1)
            console.print(f"  switchyard, 1 process: {one.wave_rate(c):.1f} jobs/s steady, {one.rate:.1f} end "
                          f"to end, mean in flight {one.mean_in_flight():.0f}; work worker CPU "
                          f"{1000 * one.worker_cpu_s / one.jobs:.1f} ms a job, on a CPU "
                          f"{100 * one.worker_busy():.0f}% of the run")
            figures += [
                Figure(NAME, f"C={c} as 1 process: throughput (steady)", one.wave_rate(c), "jobs/s",
                       baseline=IDEAL_RATE, baseline_name="ideal", note="diagnostic, no target"),
                Figure(NAME, f"C={c} as 1 process: mean calls in flight", one.mean_in_flight(),
                       "calls", baseline=float(c), baseline_name="C", note="diagnostic, no target"),
            ]
        if not extras:
            return figures
        # Variable latency: log-normal, median C/40 s, p99 five times that. The ideal is C over the
        # mean latency, which the long tail puts above the median.
        # Eight waves' worth of jobs, not four: every call starts at once, so completions come in
        # a surge about one median later and take a few waves to settle to the steady rate; with
        # four, the window saw that surge (1.1 of the ideal at the quick size).
        c = 20 if quick else 500
        n = 8 * c
        ideal = IDEAL_RATE / math.exp(SIGMA_P99_5X ** 2 / 2)
        console.print(f"[bold]in-flight[/]: C={c}, log-normal latency (median {c / 40:.2f} s, p99 "
                      f"{5 * c / 40:.1f} s), {n:,} jobs (ideal {ideal:.1f} jobs/s)")
        script = measure_script(c, n, workdir, sigma=SIGMA_P99_5X)
        sy = measure_switchyard(c, n, db, broker, workdir, console, sigma=SIGMA_P99_5X)
        figures += _report(console, f"C={c}, log-normal latency", c, n, ideal, sy, script, target=0.9)
    return figures
