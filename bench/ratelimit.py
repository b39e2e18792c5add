"""Benchmark: how close to an organisation's rate limits a batch runs, and how many 429s it earns.

The fake Claude enforces the limits per model class (token buckets for requests, input and output
tokens, refilled over the window, a minute as the API's) and answers 429 with `retry-after` past
them. switchyard is configured with the same limits (SWITCHYARD_RATE_LIMITS, the same window). Two
tiers run at once, each bound by one limit:

- *RPM-bound*: classify jobs pinned to Sonnet, whose answers are a few tokens: requests bind.
- *OTPM-bound*: draft jobs pinned to Opus, whose answers are tens of tokens against a max_tokens of
  thousands: output tokens bind, and how the client reserves max_tokens before a call and gives
  back the unused part after decides how much of the limit it can use.

Each tier's worker holds more calls than its limit lets through (fake latency 2-3 s; 1-1.5 s at
the quick size), so the batch waits on the limit, not on threads. From the fake's own request log,
per model class: the achieved rate of the binding limit through the steady part (after the first
window, whose full bucket lets a burst through on top of the rate, until the last request), as a
share of the limit; and the 429s as a share of all requests. Baseline, in the same run against a
second fake with the same limits: the plain script, a ThreadPoolExecutor of the same number of
threads per tier calling the SDK with its default retries (2, honouring retry-after) and the same
prompts.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from bench import env
from bench.jobs import write_jsonl
from bench.report import Figure
from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude.models import model_class
from pipeline.flow.prompts import work_prompt
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import JobKind
from pipeline.queries.report import terminal_count
from pipeline.settings import Settings

NAME = "rate-limit"
OUTPUT_RESERVE = "observed"
# switchyard is set a little under the organisation's limits, as the README advises: a turn taken
# at the very edge of the bucket arrives at the API a little late, and requests that left in turn
# but arrive together meet a bucket that has not refilled between them (a 429 each).
MARGIN = 0.97
THREADS = 64  # per tier, on both sides: several times what the limits let through at this latency


@dataclass(frozen=True)
class Scenario:
    label: str
    tier: str
    kind: str  # "rpm" or "otpm": the limit that binds
    per_s: float  # the limit's rate: requests or output tokens per second


@dataclass(frozen=True)
class Size:
    window_s: float  # the limits are per this period, on the fake and in switchyard
    steady_s: float  # how long the batch should run at the limit after the first window
    latency_ms: float = 2000.0  # the fake's latency: from this to this + jitter_ms
    jitter_ms: float = 1000.0


FULL = Size(window_s=60.0, steady_s=300.0)
# Half the latency: until each worker has seen a few answers it reserves max_tokens of a bucket
# that holds two such calls (pipeline.claude.ratelimit.OutputReserve), so a quick run starts in
# rounds of one call's latency; the figures are of the steady part, after them.
QUICK = Size(window_s=20.0, steady_s=15.0, latency_ms=1000.0, jitter_ms=500.0)
SCENARIOS = (Scenario("RPM-bound (sonnet, classify)", "sonnet", "rpm", 10.0),
             Scenario("OTPM-bound (opus, draft)", "opus", "otpm", 300.0))
DRAFT_OUTPUT_TOKENS = 45  # a low guess of the fake's draft answer, so the batch outlasts the window


def limits_spec(size: Size) -> tuple[int, int]:
    """(requests, output tokens) per window: the same numbers for every model class, as the fake
    applies them."""
    rpm = next(s.per_s for s in SCENARIOS if s.kind == "rpm")
    otpm = next(s.per_s for s in SCENARIOS if s.kind == "otpm")
    return round(rpm * size.window_s), round(otpm * size.window_s)


def jobs_for(s: Scenario, size: Size) -> list[dict[str, Any]]:
    seconds = size.window_s + size.steady_s  # the first bucket's burst, then the steady part
    if s.kind == "rpm":
        n = math.ceil(s.per_s * seconds)
        return [{"key": f"rl-c-{i}", "kind": "classify", "tier": s.tier, "labels": ["billing", "bug", "other"],
                 "text": f"Ticket {i}: I was charged twice for my plan this month."} for i in range(n)]
    n = math.ceil(s.per_s / DRAFT_OUTPUT_TOKENS * seconds)
    return [{"key": f"rl-d-{i}", "kind": "draft", "tier": s.tier,
             "instructions": f"Draft a polite reminder that invoice INV-{i} is overdue.",
             "context": f"Client {i}, 1,240.50 EUR, due 2026-12-15."} for i in range(n)]


def fake_args(size: Size) -> list[str]:
    rpm, otpm = limits_spec(size)
    return ["--latency-jitter-ms", str(size.jitter_ms), "--rpm", str(rpm), "--otpm", str(otpm),
            "--rate-window-s", str(size.window_s), "--retry-after-s", "1"]


@dataclass
class Share:
    achieved_per_s: float
    limit_per_s: float
    calls: int
    throttled: int  # 429s
    steady_s: float

    @property
    def share(self) -> float:
        return self.achieved_per_s / self.limit_per_s

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.calls if self.calls else 0.0


def measure(log: list[dict[str, Any]], s: Scenario, size: Size) -> Share:
    """From the fake's request log: the binding limit's achieved rate through the steady part, and
    the 429s among all of the scenario's model class's requests.

    The steady part starts when the bucket the fake began full is at its lowest (replayed from the
    log: each answered request charged at its start, the refill in between), so the first burst,
    which any client gets on top of the rate, is not counted; it ends at the last answered request.

    At its lowest, not spent: a client that paces itself a little under the limit (switchyard, at
    MARGIN of it) never empties the fake's bucket. Both buckets start full, and when the client's
    own runs dry, the fake's still holds the margin plus what refilled in between, more of it the
    slower the first burst was: with the limits here, 5% of the bucket is only reached by a burst
    of 24 calls a second, nearly all that 64 threads at 2.5 s can make. From its lowest point on,
    the fake's bucket only refills when the client sends less than the limit allows."""
    klass = model_class(f"claude-{s.tier}")
    mine = sorted((r for r in log if r["model"] and model_class(r["model"]) == klass), key=lambda r: r["started_at"])
    ok = [r for r in mine if r["status"] == 200]
    throttled = sum(r["status"] == 429 for r in mine)
    if not ok:
        return Share(0.0, s.per_s, len(mine), throttled, 0.0)

    def amount(r: dict[str, Any]) -> float:
        return 1.0 if s.kind == "rpm" else float(r["output_tokens"])

    capacity = s.per_s * size.window_s
    level, at = capacity, ok[0]["started_at"]
    levels: list[tuple[float, float]] = []
    for r in ok:
        level = min(capacity, level + (r["started_at"] - at) * s.per_s) - amount(r)
        at = r["started_at"]
        levels.append((at, level))
    # The first time within 1% of the bucket of its lowest level: a bucket held at empty touches
    # its lowest again and again, and the first touch is where the burst ended.
    lowest = min(lvl for _, lvl in levels)
    lo = next(t for t, lvl in levels if lvl <= lowest + 0.01 * capacity)
    hi = ok[-1]["started_at"]
    total = sum(amount(r) for r in ok if lo < r["started_at"] <= hi)
    return Share(total / max(hi - lo, 1e-9), s.per_s, len(mine), throttled, hi - lo)


def run_switchyard(size: Size, workdir: Path, db: str, broker: str, console: Console,
                   started: threading.Event) -> list[dict[str, Any]]:
    rpm, otpm = (math.floor(MARGIN * x) for x in limits_spec(size))
    limits = ",".join(f"{t}.{k}={v}" for t in ("haiku", "sonnet", "opus") for k, v in (("rpm", rpm), ("otpm", otpm)))
    # The fake counts the output tokens an answer has, not its max_tokens: reserve what answers
    # have been (pipeline.claude.ratelimit.OutputReserve), not the worst case.
    extra = {"SWITCHYARD_RATE_LIMITS": limits, "SWITCHYARD_RATE_WINDOW_S": str(size.window_s),
             "SWITCHYARD_RATE_OUTPUT_RESERVE": OUTPUT_RESERVE}
    sessions = session_factory(make_engine(db, pool_size=2))
    settings = Settings(DATABASE_URL=db, BROKER_URL=broker)
    with env.Processes(env.switchyard_env(database_url=db, broker=broker, claude_url="", **extra),
                       workdir=workdir) as procs:
        fake = env.start_fake(procs, latency_ms=size.latency_ms, args=fake_args(size))
        e = {"ANTHROPIC_BASE_URL": fake.url}
        # Few Postgres connections each: the database is shared, and a few jobs a second need few.
        env.start_at_once(procs, [*((f"worker-{q}", env.switchyard("worker", "--tier", q, "--concurrency", str(n),
                                                                  "--db-connections", "6"), " ready.")
                                    for q, n in (("sonnet", THREADS), ("opus", THREADS), ("validate", 32))),
                                  ("dispatcher", env.switchyard("dispatcher"), "dispatcher:")], env=e, timeout=600)
        batches = []
        for s in SCENARIOS:
            path = workdir / f"rl-{s.tier}.jsonl"
            write_jsonl(path, jobs_for(s, size))
            report = enqueue_file(sessions, path, batch=f"rl-{s.tier}-{time.time_ns()}", config=settings.models)
            batches.append((report.batch_id, report.accepted))
        started.set()
        _wait_all(sessions, batches, procs, console, timeout=size.window_s * 3 + size.steady_s * 2 + 300)
        return fake.requests()


def _wait_all(sessions: sessionmaker[Session], batches: list[tuple[int | None, int]], procs: env.Processes,
              console: Console, timeout: float) -> None:
    last = [0.0]

    def done() -> bool:
        with sessions() as s:
            ended = [terminal_count(s, batch_id=b)[0] for b, _ in batches if b is not None]
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            console.print(f"  switchyard: {sum(ended):,} of {sum(n for _, n in batches):,} jobs ended")
        return all(e >= n for e, (_, n) in zip(ended, batches, strict=True))

    env.wait_until(done, timeout=timeout, interval=1.0, procs=procs, what="the rate-limited batches")


def run_script(size: Size, workdir: Path, models: ModelConfig) -> list[dict[str, Any]]:
    """The plain script: per tier a pool of THREADS threads, one SDK call per job, the SDK's default
    retries; both tiers at once, as switchyard runs them."""
    with env.Processes(env.switchyard_env(database_url="", broker="", claude_url=""), workdir=workdir) as procs:
        fake = env.start_fake(procs, latency_ms=size.latency_ms, args=fake_args(size))
        client = anthropic.Anthropic(api_key="bench-key", base_url=fake.url)  # max_retries: the default, 2

        def caller(tier: str) -> Callable[[dict[str, Any]], bool]:
            spec = models.tier(tier)

            def one(job: dict[str, Any]) -> bool:
                prompt = work_prompt(JobKind(job["kind"]), job)
                try:
                    client.messages.create(model=spec.model, max_tokens=models.limits.work_max_tokens,
                                           system=prompt.system, messages=[{"role": "user", "content": prompt.user}])
                except anthropic.APIStatusError:
                    return False  # a plain script logs it and moves on
                return True
            return one

        pools = [ThreadPoolExecutor(THREADS) for _ in SCENARIOS]
        # Both tiers' jobs submitted at once, each to its own pool.
        futures = [f for s, pool in zip(SCENARIOS, pools, strict=True)
                   for f in [pool.submit(caller(s.tier), j) for j in jobs_for(s, size)]]
        for f in futures:
            f.result()
        for pool in pools:
            pool.shutdown()
        client.close()
        return fake.requests()


def run(*, quick: bool, console: Console, profile: bool = False) -> list[Figure]:
    size = QUICK if quick else FULL
    rpm, otpm = limits_spec(size)
    slowest = (size.latency_ms + size.jitter_ms) / 1000
    console.print(f"[bold]rate-limit[/]: limits {rpm} requests and {otpm:,} output tokens per {size.window_s:.0f} s "
                  f"window per model class, fake latency {size.latency_ms / 1000:g}-{slowest:g} s, {THREADS} threads "
                  f"a tier; switchyard and the script side by side")
    models = Settings().models
    broker = env.broker_url()
    with env.scratch_database() as db, env.workdir() as workdir:
        started = threading.Event()
        result: dict[str, list[dict[str, Any]]] = {}
        # The two sides run at once, each against its own fake: the same minutes, the same machine.
        def switchyard_side() -> None:
            try:
                result["sy"] = run_switchyard(size, workdir, db, broker, console, started)
            finally:
                started.set()  # a side that fails to start must not keep the script waiting

        sy = threading.Thread(target=switchyard_side, daemon=True)
        sy.start()
        started.wait(600)
        result["script"] = run_script(size, workdir, models)
        sy.join()
    if "sy" not in result:
        raise RuntimeError("the switchyard side of the rate-limit benchmark did not finish")
    figures: list[Figure] = []
    for s in SCENARIOS:
        mine, script = measure(result["sy"], s, size), measure(result["script"], s, size)
        unit = "requests/s" if s.kind == "rpm" else "output tokens/s"
        console.print(f"  {s.label}: switchyard {mine.achieved_per_s:.2f} {unit} ({100 * mine.share:.1f}% of the "
                      f"limit over {mine.steady_s:.0f} s), 429s {mine.throttled}/{mine.calls}; script "
                      f"{script.achieved_per_s:.2f} ({100 * script.share:.1f}%), "
                      f"429s {script.throttled}/{script.calls}")
        extra = {"window_s": size.window_s, "steady_s": mine.steady_s, "calls": mine.calls, "429s": mine.throttled,
                 "script_share": script.share, "script_calls": script.calls, "script_429s": script.throttled,
                 "script_steady_s": script.steady_s}
        figures += [
            Figure(NAME, f"{s.label}: achieved {s.kind.upper()} vs limit", mine.achieved_per_s, unit,
                   baseline=s.per_s, baseline_name=f"limit; script {100 * script.share:.0f}%", target=0.95,
                   extra=extra),
            Figure(NAME, f"{s.label}: 429s, share of calls", 100 * mine.throttled_share, "%", target=1.0,
                   target_kind="<=", note=f"script {100 * script.throttled_share:.1f}%"),
        ]
    return figures
