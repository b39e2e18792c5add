"""Benchmark 5: prompt caching.

One classify task whose shared part (instructions, label definitions, examples) is about 5,000
tokens as the enqueue estimates them (``estimate_text_tokens``), applied with
``switchyard tasks apply``, and 2,000 short classify jobs under it whose difficulty hints send
about 40% easy, 25% medium and 35% hard through the fake's triage, so Haiku triages every job and
both Sonnet and Opus get work. The batch runs through the real workers (each tier at its default
concurrency) and the dispatcher against the fake Claude over HTTP (1 s a call, so that requests
overlap as they do against the API), twice, each on a new database, broker and fake: with
``[caching] enabled = true`` and with it false (a configuration file named by SWITCHYARD_CONFIG).

From the ``model_calls`` rows, per tier and stage: the calls, their uncached input, cache-write and
cache-read tokens; the hit rate, cache reads / (reads + writes): the share of the cacheable input
read from the cache (a job's own text is never cacheable, so it is left out); and the input-side
cost (uncached input, writes and reads at the configured multipliers) against the same batch's with
caching off. Targets: hit rate >= 95% on every tier, input cost <= 0.2x uncached on the work tiers.

The fake, like the API, makes a cache entry readable only when the call that wrote it has answered:
the calls that start before that would all miss, and write. The warm-up gate (pipeline.flow.warmup)
holds them back until then, so each prefix is written once; without it
(SWITCHYARD_CACHE_WARMUP_LEASE_S=0) the hit rate falls as more calls start together (the tier's
concurrency) and rises with the batch's length.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench import env
from bench.jobs import write_jsonl
from bench.report import Figure
from pipeline.cli.operate import default_concurrency
from pipeline.config import ModelConfig, load_config
from pipeline.db import make_engine, session_factory
from pipeline.flow.prompts import task_sections
from pipeline.intake.jobspec import estimate_text_tokens
from pipeline.intake.tasks import parse_task
from pipeline.models import Job, JobKind, JobStatus, ModelCall

NAME = "caching"
TASK = "support-routing"
SHARED_TOKENS = 5_000
HIT_RATE_TARGET = 95.0  # percent
COST_TARGET = 0.2  # cached input cost / uncached, on the work tiers
TIERS = ("triage", "sonnet", "opus", "validate")
MILLION = Decimal(1_000_000)

LABELS = {
    "billing": "Charges, invoices, plan prices, taxes and payment methods: anything about money the customer owes "
               "or has paid, including a charge they do not recognise or dispute.",
    "refund": "The customer asks for money back, for a cancelled plan, a duplicate charge or a service that did "
              "not work, or asks where a refund they were promised has gone.",
    "bug": "The product does something wrong: an error message, a crash, a wrong result, a button that does "
           "nothing, a feature that worked before and stopped after an update.",
    "outage": "The product or part of it is unreachable for the customer or their whole team: pages do not load, "
              "the API times out, sign-in fails for everyone at once.",
    "performance": "The product works but is slow: pages that take long to load, exports or reports that take "
                   "hours, searches that time out on large accounts.",
    "account": "Signing in, passwords, two-factor codes, email address changes, account ownership, and closing "
               "or reopening an account.",
    "security": "A suspected break-in, an unknown device or sign-in, a leaked key, phishing that uses our name, "
                "or a question about how we protect the customer's data.",
    "data_export": "Getting the customer's data out: CSV and JSON exports, backups, the export API, and moving "
                   "data to another product.",
    "integration": "Connecting the product to another one: webhooks, single sign-on, the calendar and chat "
                   "integrations, API keys and their scopes.",
    "team": "Inviting, removing and managing team members, roles and permissions, seats on the plan, and "
            "transferring work between members.",
    "feature_request": "The customer asks for something the product does not do yet, or for a change to how "
                       "an existing feature works.",
    "other": "Anything else: praise, questions about the company, press and partnership requests, and tickets "
             "with no clear ask.",
}
ASKS = {
    "billing": ("I was charged twice for the same month", "the invoice shows a price higher than our plan",
                "there is a charge on my card I do not recognise"),
    "refund": ("please refund the annual plan I cancelled yesterday", "I want my money back for the week the "
               "service was down", "where is the refund you promised last month"),
    "bug": ("the save button does nothing on the settings page", "the report totals are wrong since the update",
            "the mobile app crashes when I open a shared folder"),
    "outage": ("nobody on our team can load the dashboard", "the API has returned timeouts for an hour",
               "sign-in fails for every user in our workspace"),
    "performance": ("the dashboard takes a minute to load", "exports of our large project never finish",
                    "search times out on our account"),
    "account": ("I cannot get the two-factor code on my new phone", "please change the email on my account",
                "I want to close my account"),
    "security": ("I got a sign-in alert from a country I have never visited", "an email asking for my password "
                 "claims to come from you", "we think an API key was leaked"),
    "data_export": ("how do I export every project as JSON", "the CSV export leaves out the comments",
                    "we need a full backup before we move to another tool"),
    "integration": ("the webhook stopped reaching our server", "single sign-on with our provider fails",
                    "the calendar integration shows the wrong times"),
    "team": ("how do I give a colleague admin rights", "please remove a member who left the company",
             "we need five more seats on our plan"),
    "feature_request": ("could the board view have a dark mode", "please let us schedule reports weekly",
                        "we would like tags on comments"),
    "other": ("your support team was wonderful today", "are you hiring in Berlin",
              "I would like to write about your company for a magazine"),
}
CONTEXTS = ("Since this morning", "On our team workspace", "For the third time this week", "After the last update",
            "On the company account", "Since we moved to the annual plan", "For our client project",
            "Before our audit next week", "On both my laptop and my phone", "Since my colleague left")
INSTRUCTIONS = """
Route each customer support ticket to the one team that must act on it first. Read the whole
ticket and judge by what the customer asks us to do, not by the words they happen to use: a
customer who disputes a charge that a bug caused needs billing first, and one who asks for their
money back needs refund even when they explain the bug at length. When a ticket asks for two
things, choose the one that is more urgent for the customer; a possible security problem is always
more urgent than anything else in the same ticket. Tickets may be short, rude, misspelt or written
in a hurry; they may quote earlier emails, and the quoted part is context, not the ask. Answer with
one label from the list, spelled exactly as it is given, and nothing else. The examples show how
earlier tickets were routed by the support leads.
"""
# Difficulty hints for the fake's triage, 20 jobs at a time: 8 easy and 5 medium (Sonnet), 7 hard (Opus).
MIX = ("easy",) * 8 + ("medium",) * 5 + ("hard",) * 7


def task_definition(target_tokens: int = SHARED_TOKENS) -> dict[str, Any]:
    """The task, with examples added until its shared part reaches ``target_tokens``."""
    names = list(LABELS)
    obj: dict[str, Any] = {"name": TASK, "kind": "classify", "instructions": INSTRUCTIONS,
                           "labels": [{"name": n, "description": d} for n, d in LABELS.items()], "examples": []}
    i = 0
    while shared_tokens(obj) < target_tokens:
        label, ask = names[i % len(names)], (i // len(names)) % 3
        # Every (label, ask) pair comes back each 36 examples with another context: no two alike.
        context = CONTEXTS[(i + i // (3 * len(names))) % len(CONTEXTS)]
        obj["examples"].append({"input": f"{context}: {ASKS[label][ask]}.", "output": label})
        i += 1
    return obj


def shared_tokens(obj: dict[str, Any]) -> int:
    """The task's part of a work prompt, in the tokens the enqueue estimates."""
    definition = parse_task(obj, work_tiers=("sonnet", "opus")).definition()
    return estimate_text_tokens("\n".join(task_sections(JobKind.CLASSIFY, definition)))


def task_toml(obj: dict[str, Any]) -> str:
    # A JSON string of ASCII text is a valid TOML basic string.
    q = json.dumps
    lines = [f"name = {q(obj['name'])}", f"kind = {q(obj['kind'])}", f"instructions = {q(obj['instructions'])}"]
    for label in obj["labels"]:
        lines += ["", "[[labels]]", f"name = {q(label['name'])}", f"description = {q(label['description'])}"]
    for example in obj["examples"]:
        lines += ["", "[[examples]]", f"input = {q(example['input'])}", f"output = {q(example['output'])}"]
    return "\n".join(lines) + "\n"


def task_jobs(n: int, *, prefix: str = "c") -> list[dict[str, Any]]:
    """Short tickets under the task, each with a difficulty hint for the fake's triage."""
    names = list(LABELS)
    jobs = []
    for i in range(n):
        label = names[(i * 5) % len(names)]
        text = f"Ticket {i}: {ASKS[label][i % 3]}. [fake:difficulty={MIX[i % len(MIX)]}]"
        jobs.append({"key": f"{prefix}-{i}", "task": TASK, "text": text})
    return jobs


def config_text(*, caching: bool) -> str:
    """The bundled configuration, with caching switched on or off."""
    text = resources.files("pipeline").joinpath("defaults.toml").read_text()
    if text.count("\nenabled = true\n") != 1:
        raise RuntimeError("defaults.toml: expected one 'enabled = true' line (in [caching]) to switch")
    return text.replace("\nenabled = true\n", f"\nenabled = {'true' if caching else 'false'}\n")


@dataclass
class Usage:
    """The summed model_calls of one tier and stage."""

    calls: int = 0
    input: int = 0
    writes: int = 0
    reads: int = 0
    output: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Percent of the cacheable input read from the cache; None when nothing was cacheable."""
        cacheable = self.reads + self.writes
        return 100 * self.reads / cacheable if cacheable else None

    def input_cost(self, models: ModelConfig, tier: str) -> Decimal:
        """USD for the input side: uncached input, cache writes and reads at their multipliers."""
        t = models.tier(tier)
        tokens = (self.input + self.writes * models.cache_write_multiplier_for(t.cache_ttl)
                  + self.reads * models.cache_read_multiplier)
        return tokens * t.input_per_mtok / MILLION


@dataclass
class Run:
    caching: bool
    jobs: int
    seconds: float
    ok: int
    usage: dict[tuple[str, str], Usage] = field(default_factory=dict)  # (tier, stage) -> summed calls
    fake_cache: dict[str, Any] = field(default_factory=dict)  # the fake's own counters, per model

    def tier(self, tier: str) -> Usage:
        total = Usage()
        for (t, _), u in self.usage.items():
            if t == tier:
                total = Usage(total.calls + u.calls, total.input + u.input, total.writes + u.writes,
                              total.reads + u.reads, total.output + u.output)
        return total

    @property
    def tiers(self) -> list[str]:
        return list(dict.fromkeys(t for t, _ in self.usage))


def _usage(sessions: sessionmaker[Session], batch_id: int) -> dict[tuple[str, str], Usage]:
    with sessions() as s:
        rows = s.execute(
            select(ModelCall.tier, ModelCall.stage, func.count(), func.sum(ModelCall.input_tokens),
                   func.sum(ModelCall.cache_creation_input_tokens), func.sum(ModelCall.cache_read_input_tokens),
                   func.sum(ModelCall.output_tokens))
            .join(Job, Job.id == ModelCall.job_id).where(Job.batch_id == batch_id)
            .group_by(ModelCall.tier, ModelCall.stage).order_by(func.min(ModelCall.id))).all()
    return {(tier, stage.value): Usage(int(n), int(i or 0), int(w or 0), int(r or 0), int(o or 0))
            for tier, stage, n, i, w, r, o in rows}


def _apply(workdir: Path, e: dict[str, str]) -> None:
    """The task, applied as an operator applies one."""
    task_path = workdir / "task.toml"
    task_path.write_text(task_toml(task_definition()))
    applied = subprocess.run(env.switchyard("tasks", "apply", str(task_path)), env=e, cwd=env.ROOT,
                             capture_output=True, text=True, check=False)
    if applied.returncode != 0:
        raise RuntimeError(f"switchyard tasks apply failed:\n{applied.stdout}{applied.stderr}")


def measure(*, caching: bool, n: int, concurrency: dict[str, int], latency_ms: float, workdir: Path,
            console: Console) -> Run:
    label = "on" if caching else "off"
    config_path = workdir / f"caching-{label}.toml"
    config_path.write_text(config_text(caching=caching))
    models = load_config(config_path)
    assert models.caching is caching
    broker = env.broker_url()
    with env.scratch_database() as db:
        engine = make_engine(db, pool_size=2)
        sessions = session_factory(engine)
        e = env.switchyard_env(database_url=db, broker=broker, claude_url="", SWITCHYARD_CONFIG=str(config_path),
                               SWITCHYARD_DB_CONNECTIONS=str(env.UNTIMED_DB_CONNECTIONS))
        with env.Processes(e, workdir=workdir) as procs:
            fake = env.start_fake(procs, latency_ms=latency_ms)
            env.start_together(procs, {tier: concurrency[tier] for tier in TIERS}, env={"ANTHROPIC_BASE_URL": fake.url},
                            while_starting=lambda: _apply(workdir, e))
            path = write_jsonl(workdir / f"jobs-{label}.jsonl", task_jobs(n))
            console.print(f"  caching {label}: {n:,} jobs ...")
            t0 = time.monotonic()
            batch_id = env.enqueue_all(sessions, path, n=n, batch=f"caching-{label}", config=models)
            # Two calls a job, C at a time per tier, each taking the latency: three times that, and a margin.
            waves = 2 * n / min(concurrency.values()) * latency_ms / 1000
            t1 = env.wait_until(env.batch_ended(sessions, batch_id, n), timeout=120 + 3 * waves, interval=0.2,
                                procs=procs, what=f"caching {label} batch")
            fake_cache = fake.stats().get("cache", {})
        with sessions() as s:
            ok = s.scalar(select(func.count()).where(Job.batch_id == batch_id, Job.status == JobStatus.SUCCEEDED)) or 0
        run = Run(caching, n, t1 - t0, ok, _usage(sessions, batch_id), fake_cache)
        engine.dispose()
    return run


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}%"


def details(on: Run, off: Run, models: ModelConfig) -> Table:
    """Per tier and stage, both runs side by side."""
    t = Table(title="caching: model calls per tier and stage (caching on | off)")
    for col in ("tier", "stage", "calls", "input", "cache writes", "cache reads", "hit rate", "input cost on",
                "input cost off", "ratio"):
        t.add_column(col, justify="left" if col in ("tier", "stage") else "right")
    for key in dict.fromkeys([*on.usage, *off.usage]):
        a, b = on.usage.get(key, Usage()), off.usage.get(key, Usage())
        cost_a, cost_b = a.input_cost(models, key[0]), b.input_cost(models, key[0])
        t.add_row(key[0], key[1], f"{a.calls:,} | {b.calls:,}", f"{a.input:,} | {b.input:,}",
                  f"{a.writes:,} | {b.writes:,}", f"{a.reads:,} | {b.reads:,}", _pct(a.hit_rate),
                  f"${cost_a:.4f}", f"${cost_b:.4f}", f"{cost_a / cost_b:.3f}" if cost_b else "—")
    return t


def figures(on: Run, off: Run, models: ModelConfig, *, concurrency: dict[str, int], latency_ms: float,
            shared: int) -> list[Figure]:
    out: list[Figure] = []
    work = set(models.work_tiers)
    for tier in dict.fromkeys([*on.tiers, *off.tiers]):
        a, b = on.tier(tier), off.tier(tier)
        stages = "+".join(sorted({s for t, s in on.usage if t == tier}))
        queue = next((q for q in models.queues if models.queue_tier(q) == tier), tier)
        extra = {"jobs": on.jobs, "stages": stages, "concurrency": concurrency.get(queue), "latency_ms": latency_ms,
                 "shared_tokens_estimated": shared, "calls_on": a.calls, "calls_off": b.calls,
                 "input_on": a.input, "cache_write_on": a.writes, "cache_read_on": a.reads, "input_off": b.input,
                 "cache_write_off": b.writes, "cache_read_off": b.reads,
                 "input_cost_on_usd": float(a.input_cost(models, tier)),
                 "input_cost_off_usd": float(b.input_cost(models, tier)),
                 "seconds_on": on.seconds, "seconds_off": off.seconds, "succeeded_on": on.ok, "succeeded_off": off.ok}
        hit = a.hit_rate
        out.append(Figure(NAME, f"{tier} ({stages}): cache hit rate, reads / (reads + writes)",
                          hit if hit is not None else 0.0, "%", target=HIT_RATE_TARGET, target_kind=">=",
                          note="" if hit is not None else "nothing cacheable was sent", extra=extra))
        # Per 1,000 jobs of the batch, so that a quick run's cents still read as figures.
        per_k = Decimal(1000) / on.jobs
        out.append(Figure(NAME, f"{tier} ({stages}): input cost per 1,000 jobs, caching on vs off",
                          float(a.input_cost(models, tier) * per_k), "USD",
                          baseline=float(b.input_cost(models, tier) * per_k),
                          baseline_name="caching off", target=COST_TARGET if tier in work else None,
                          target_kind="ratio<=", note="" if tier in work else "triage tier: no target",
                          extra=extra))
    return out


def run(*, quick: bool, console: Console, profile: bool = False, jobs: int | None = None,
        latency_ms: float | None = None, concurrency: int | None = None) -> list[Figure]:
    """``profile`` is not offered: the figures are tokens and dollars, not time. ``concurrency``
    sets every tier's worker threads; by default each tier runs at its ``switchyard worker``
    default (the --quick size at a quarter of it)."""
    n = jobs or (120 if quick else 2_000)
    latency = latency_ms if latency_ms is not None else (200.0 if quick else 1000.0)
    per_tier = {t: concurrency or max(1, default_concurrency(t) // (4 if quick else 1)) for t in TIERS}
    shared = shared_tokens(task_definition())
    console.print(f"[bold]caching[/]: {n:,} classify jobs under one task (shared part ~{shared:,} tokens), fake "
                  f"latency {latency:.0f} ms, worker threads {per_tier}; caching on, then off")
    with env.workdir() as workdir:
        on = measure(caching=True, n=n, concurrency=per_tier, latency_ms=latency, workdir=workdir, console=console)
        off = measure(caching=False, n=n, concurrency=per_tier, latency_ms=latency, workdir=workdir, console=console)
    models = load_config()
    # The switch is what is measured against: a run with it off that still touched the cache
    # would make every ratio meaningless.
    stray = sum(u.writes + u.reads for u in off.usage.values())
    if stray:
        raise RuntimeError(f"caching off, yet {stray:,} cache tokens were written or read: the switch leaks")
    console.print(details(on, off, models))
    console.print(f"  caching on: {on.ok}/{on.jobs} succeeded in {on.seconds:.1f} s; off: {off.ok}/{off.jobs} in "
                  f"{off.seconds:.1f} s; the fake's cache counters (on): {json.dumps(on.fake_cache)}")
    return figures(on, off, models, concurrency=per_tier, latency_ms=latency, shared=shared)
