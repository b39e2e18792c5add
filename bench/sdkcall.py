"""The CPU one model call costs this process: building the request and reading the response
through the official SDK, against the fake Claude (in its own process) at zero latency.

Each way is timed in turn, in rounds, in the same run: ``sdk`` (``ClaudeClient(lean=False)``: the
SDK's parsed ``Message``, the pydantic model, and its OpenTelemetry spans, as it was before),
``orjson`` (``ClaudeClient()``: the raw body read with orjson through ``with_raw_response``, the
spans off), and ``plain`` (the one-liner a team writes: ``client.messages.create(...)``, the SDK's
defaults; what the peer chain of ``bench.peer`` pays). ``--profile`` runs each under py-spy and says where its CPU goes.

``python -m bench.sdkcall --loop MODE N URL`` is the loop alone, for py-spy to run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anthropic
from rich.console import Console

from bench import env
from bench.jobs import classify_jobs
from bench.profile import PROFILES, categorise
from bench.report import Figure
from pipeline.claude.client import ClaudeClient
from pipeline.config import load_config
from pipeline.flow.prompts import triage_prompt, work_prompt
from pipeline.models import JobKind

NAME = "sdk"
MODES = ("sdk", "orjson", "plain")


def _caller(mode: str, url: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """One call (of the i-th job: a triage, then a work call, alternately) the way ``mode`` makes it,
    and how to close what it holds."""
    models = load_config()
    jobs = classify_jobs(64, prefix="sdk")
    prompts = []
    for i, job in enumerate(jobs):
        tier = models.triage_tier if i % 2 == 0 else "sonnet"
        prompt = (triage_prompt(JobKind.CLASSIFY, job) if i % 2 == 0
                  else work_prompt(JobKind.CLASSIFY, job))
        prompts.append((tier, models.tier(tier).model, prompt))
    if mode == "plain":
        sdk = anthropic.Anthropic(api_key="bench-key", base_url=url)

        def plain(i: int) -> None:
            _, model, p = prompts[i % len(prompts)]
            extra: dict[str, Any] = {"output_config": {"format": {"type": "json_schema",
                                                                  "schema": p.output_schema}}}
            message = sdk.messages.create(model=model, max_tokens=200, system=p.system,
                                          messages=[{"role": "user", "content": p.user}], **extra)
            assert "".join(b.text for b in message.content if b.type == "text")

        return plain, sdk.close
    client = ClaudeClient(api_key="bench-key", base_url=url, lean=mode == "orjson")

    def ours(i: int) -> None:
        tier, model, p = prompts[i % len(prompts)]
        result = client.call(tier=tier, model=model, system=p.system, user=p.user, max_tokens=200,
                             output_schema=p.output_schema)
        assert result.text and result.attempts[-1].usage.output_tokens > 0

    return ours, client.close


def _loop(mode: str, n: int, url: str) -> float:
    """CPU seconds of this process for ``n`` calls (after a few to warm up)."""
    call, close = _caller(mode, url)
    for i in range(20):
        call(i)
    used = _timed(call, n)
    close()
    return used


def _timed(call: Callable[[int], None], n: int) -> float:
    t0 = time.process_time()
    for i in range(n):
        call(i)
    return time.process_time() - t0


def _profile(mode: str, n: int, url: str, console: Console) -> dict[str, float]:
    PROFILES.mkdir(parents=True, exist_ok=True)
    out = PROFILES / f"sdkcall-{mode}.txt"
    spy = str(env.BIN / "py-spy")
    subprocess.run([spy, "record", "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out), "--",
                    sys.executable, "-m", "bench.sdkcall", "--loop", mode, str(n), url],
                   check=True, capture_output=True, cwd=env.ROOT)
    shares = categorise(out, within="_timed (bench/sdkcall.py")
    console.print(f"  {mode}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()) + f" ({out})")
    return shares


def run(*, quick: bool, console: Console, calls: int | None = None, rounds: int = 3,
        profile: bool = False) -> list[Figure]:
    n = calls or (600 if quick else 3000)
    per_round = max(1, n // rounds)
    console.print(f"[bold]sdk[/]: CPU per model call in this process, {per_round * rounds:,} calls per way in "
                  f"{rounds} rounds, fake Claude at zero latency")
    used = dict.fromkeys(MODES, 0.0)
    shares: dict[str, dict[str, float]] = {}
    with env.workdir() as wd, env.Processes(env.switchyard_env(database_url="", broker="", claude_url=""),
                                            workdir=wd) as procs:
        fake = env.start_fake(procs, latency_ms=0)
        for _ in range(rounds):
            for mode in MODES:
                used[mode] += _loop(mode, per_round, fake.url)
        if profile:
            for mode in MODES:
                shares[mode] = _profile(mode, max(per_round, 1000), fake.url, console)
    ms = {mode: 1000 * used[mode] / (per_round * rounds) for mode in MODES}
    console.print("  CPU ms per call: " + ", ".join(f"{m} {v:.2f}" for m, v in ms.items()))
    extra = {"calls": per_round * rounds, "rounds": rounds, "cpu_ms_per_call": ms, "profile_shares": shares}
    return [Figure(NAME, "CPU ms per call, ClaudeClient: raw body read with orjson vs the SDK's Message",
                   ms["orjson"], "ms", baseline=ms["sdk"], baseline_name="SDK Message", extra=extra),
            Figure(NAME, "CPU ms per call, ClaudeClient (orjson) vs plain messages.create (the peer's)",
                   ms["orjson"], "ms", baseline=ms["plain"], baseline_name="plain SDK", extra=extra)]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--loop":
        print(_loop(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    else:
        sys.exit("usage: python -m bench.sdkcall --loop MODE N URL  (or: python -m bench sdk)")
