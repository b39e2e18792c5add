"""Benchmark 6: routing quality, measured against the truth.

3,000 mixed jobs (four in five classify, one in five extract; by their [fake:difficulty] hints 40%
easy, 30% medium, 30% hard) against the fake Claude with its quality model on: the ``default``
error rates (printed in the report) and triage noise 0.1, so one job in ten is triaged at another
difficulty than its own. The same jobs run five times through the real workers (each queue at its
default concurrency) and the dispatcher, each run on a new database, broker and fake:

- **seed**: the bundled policy (pipeline/defaults.toml), the batch at shadow rate 0.1;
- **cascade**: pipeline/samples/cascade.toml (easy jobs worked by Haiku);
- **medium=opus**: the bundled policy with medium jobs sent to Opus;
- **all-sonnet** and **all-opus**: every job pinned to the tier, no triage.

The fake's truth (pipeline.fake_claude.is_correct) gives each run's true accuracy; the all-opus
run's answers are the reference tier's, so a run's true agreement is the share of its jobs whose
answer is the same as Opus's on the same job (compared as shadow evaluation compares them:
pipeline.quality.agreement). Reported:

- ``switchyard quality``'s estimate of the seed run's agreement, with its 95% interval, against
  the true agreement; target: the truth inside the interval;
- each run's cost (the jobs' own, evaluation left out) and true accuracy, side by side;
- whatif's prediction (pipeline.quality.whatif.estimate_policy, from the seed run's records) of
  medium=opus's and the cascade's cost and agreement, against each policy actually run; targets:
  cost within 5%, agreement within 2 points of the true one. The seed run never worked a job at
  Haiku, so whatif has no shadow result there for the cascade: its figure shows what that leaves.
"""

from __future__ import annotations

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
from pipeline.config import ModelConfig, RoutingPolicy, load_config
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude import DEFAULT_ERROR_RATES, is_correct
from pipeline.models import OPEN_SHADOW, Job, JobStatus, ShadowEvaluation
from pipeline.quality.agreement import same_fields, same_label
from pipeline.quality.whatif import PolicyEstimate, custom_policy, describe, estimate_policy, with_routing
from pipeline.queries.quality import quality

NAME = "quality"
SHADOW_RATE = 0.1
TRIAGE_NOISE = 0.1
COST_TOLERANCE = 0.05  # whatif's cost against the run's, relative
AGREEMENT_TOLERANCE = 0.02  # whatif's agreement against the truth, absolute
DEFAULTS = Path(str(resources.files("pipeline").joinpath("defaults.toml")))
CASCADE = Path(str(resources.files("pipeline").joinpath("samples/cascade.toml")))
# The policies whatif predicts from the seed run's records, each also run: medium=opus from tiers
# the seed run worked; the cascade with a work tier (haiku) it never worked.
WHATIF_POLICIES = ("medium=opus", "cascade")

LABELS = ["billing", "bug", "account", "feature_request", "other"]
ASKS = (
    "I was charged twice for my plan this month", "the export button does nothing in Firefox",
    "I cannot get the two-factor code on my new phone", "could the board view have a dark mode",
    "your support team was wonderful today", "my invoice shows the wrong VAT number",
    "the app crashes on startup since the last update", "please change the email on my account",
    "we would like to schedule reports weekly", "are you hiring in Berlin",
    "a charge on my card I do not recognise", "search results are empty for any query with an apostrophe",
)
SCHEMA = {"type": "object", "required": ["invoice_number", "total", "currency", "due_date"],
          "properties": {"invoice_number": {"type": "string"}, "total": {"type": "number", "minimum": 0},
                         "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                         "due_date": {"type": "string", "format": "date"}},
          "additionalProperties": False}
CURRENCIES = ("EUR", "USD", "GBP")
# Per 20 jobs: 8 easy, 6 medium, 6 hard; every fifth job an extraction.
MIX = ("easy",) * 8 + ("medium",) * 6 + ("hard",) * 6


@dataclass(frozen=True)
class Policy:
    name: str
    config: Path | None  # None: the bundled defaults
    pin: str | None = None  # every job pinned to this tier, no triage
    shadow_rate: float | None = None
    routes: tuple[str, ...] = ()  # DIFFICULTY=TIER over the defaults' [routing]


POLICIES = (Policy("seed", None, shadow_rate=SHADOW_RATE), Policy("cascade", CASCADE),
            Policy("medium=opus", None, routes=("medium=opus",)), Policy("all-sonnet", None, pin="sonnet"),
            Policy("all-opus", None, pin="opus"))


def workload(n: int) -> list[dict[str, Any]]:
    """The jobs, as users send them: each unique, with a difficulty hint for the fake's truth."""
    jobs: list[dict[str, Any]] = []
    for i in range(n):
        difficulty = MIX[(i * 7) % len(MIX)]
        if i % 5 == 4:
            text = (f"Invoice INV-{1000 + i} from Northwind Ltd. Total due: {(i * 37) % 5000 + 10}.50 "
                    f"{CURRENCIES[i % 3]} by 2027-0{1 + i % 9}-{10 + i % 18}. [fake:difficulty={difficulty}]")
            jobs.append({"key": f"q-{i}", "kind": "extract", "text": text, "schema": SCHEMA})
        else:
            text = f"Ticket {i}: {ASKS[i % len(ASKS)]}. [fake:difficulty={difficulty}]"
            jobs.append({"key": f"q-{i}", "kind": "classify", "text": text, "labels": LABELS})
    return jobs


@dataclass
class Run:
    policy: str
    jobs: int
    seconds: float
    succeeded: int
    cost_usd: Decimal  # the jobs' own cost: every stage but shadow evaluation
    outputs: dict[str, Any]  # key -> output, succeeded jobs only
    tiers: dict[str, int]  # final tier -> jobs
    extra: dict[str, Any] = field(default_factory=dict)


def _config(policy: Policy, workdir: Path) -> tuple[Path, ModelConfig]:
    path = policy.config or DEFAULTS
    if policy.routes:
        routing = custom_policy(load_config(path), routes=policy.routes)
        text = with_routing(path.read_text(), routing, comment=f"bench quality: {policy.name}", source=policy.name)
        path = workdir / f"{policy.name.replace('=', '-')}.toml"
        path.write_text(text)
    return path, load_config(path)


def measure(policy: Policy, jobs: list[dict[str, Any]], *, workdir: Path, latency_ms: float,
            concurrency: int | None, console: Console, whatif: dict[str, RoutingPolicy] | None = None) -> Run:
    """One policy over the jobs, on a new database, broker and fake."""
    config_path, models = _config(policy, workdir)
    payloads = [{**j, "tier": policy.pin} if policy.pin else j for j in jobs]
    path = write_jsonl(workdir / f"jobs-{policy.name}.jsonl", payloads)
    per_queue = {q: concurrency or default_concurrency(q) for q in models.queues}
    broker = env.broker_url()
    with env.scratch_database() as db:
        engine = make_engine(db, pool_size=2)
        sessions = session_factory(engine)
        e = env.switchyard_env(database_url=db, broker=broker, claude_url="", SWITCHYARD_CONFIG=str(config_path),
                               SWITCHYARD_DB_CONNECTIONS=str(env.UNTIMED_DB_CONNECTIONS))
        with env.Processes(e, workdir=workdir) as procs:
            fake = env.start_fake(procs, latency_ms=latency_ms,
                                  args=["--error-rates", "default", "--triage-noise", str(TRIAGE_NOISE)])
            claude = {"ANTHROPIC_BASE_URL": fake.url}
            env.start_together(procs, per_queue, env=claude)
            console.print(f"  {policy.name}: {len(jobs):,} jobs, queues {per_queue} ...")
            t0 = time.monotonic()
            batch_id = env.enqueue_all(sessions, path, n=len(jobs), batch=f"quality-{policy.name}", config=models,
                                       shadow_rate=policy.shadow_rate)
            jobs_ended = env.batch_ended(sessions, batch_id, len(jobs))

            def done() -> bool:
                if not jobs_ended():
                    return False
                with sessions() as s:
                    # The shadows run after their jobs, at the lowest priority: wait for them too.
                    return not s.scalar(select(func.count()).select_from(ShadowEvaluation)
                                        .join(Job, Job.id == ShadowEvaluation.job_id)
                                        .where(Job.batch_id == batch_id, ShadowEvaluation.status.in_(OPEN_SHADOW)))

            # Three calls a job at most, a tier's threads at a time, plus a margin for the CPU.
            waves = 3 * len(jobs) / min(per_queue.values()) * latency_ms / 1000
            t1 = env.wait_until(done, timeout=300 + 3 * waves + len(jobs) / 5, interval=0.5, procs=procs,
                                what=f"quality {policy.name} batch")
        run = _read(sessions, batch_id, policy=policy.name, jobs=len(jobs), seconds=t1 - t0)
        if policy.shadow_rate:
            with sessions() as s:
                run.extra["quality"] = quality(s, models, batch_id=batch_id)
                run.extra["whatif"] = _whatif(s, batch_id=batch_id, models=models, policies=whatif or {})
        engine.dispose()
    return run


def _read(sessions: sessionmaker[Session], batch_id: int, *, policy: str, jobs: int, seconds: float) -> Run:
    with sessions() as s:
        rows = s.execute(select(Job.key, Job.status, Job.tier, Job.output, Job.cost_usd)
                         .where(Job.batch_id == batch_id)).all()
    outputs = {key: output for key, status, _, output, _ in rows if status == JobStatus.SUCCEEDED}
    tiers: dict[str, int] = {}
    for _, status, tier, _, _ in rows:
        if status == JobStatus.SUCCEEDED:
            tiers[tier or "-"] = tiers.get(tier or "-", 0) + 1
    cost = sum((Decimal(c or 0) for *_, c in rows), Decimal(0))
    return Run(policy, jobs, seconds, len(outputs), cost, outputs, tiers)


def _whatif(session: Session, *, batch_id: int, models: ModelConfig,
            policies: dict[str, RoutingPolicy]) -> dict[str, PolicyEstimate]:
    """whatif's estimate of each policy from the seed run's rows, with no model call."""
    return {name: estimate_policy(session, batch_id=batch_id, models=models, policy=policy)
            for name, policy in policies.items()}


@dataclass(frozen=True)
class Truth:
    accuracy: float  # share of the jobs answered rightly (a job that failed counts as wrong)
    agreement: float  # share of the jobs answered as the reference answered them


def truth(run: Run, jobs: list[dict[str, Any]], reference: dict[str, Any]) -> Truth:
    right = agreed = 0
    for job in jobs:
        key, kind = job["key"], job["kind"]
        if key not in run.outputs:
            continue
        answer = run.outputs[key]
        right += is_correct(answer, job, kind)
        if key in reference:
            same = same_label if kind == "classify" else same_fields
            agreed += same(answer, reference[key]).agreed
    return Truth(right / len(jobs), agreed / len(jobs))


def _usd(x: Decimal | float) -> str:
    return f"${float(x):,.2f}" if abs(float(x)) >= 1 else f"${float(x):.4f}"


def rates_line() -> str:
    return "; ".join(f"{klass} " + "/".join(f"{r:g}" for r in table.values())
                     for klass, table in DEFAULT_ERROR_RATES.items()) + " (easy/medium/hard)"


def cost_quality_table(runs: list[Run], truths: dict[str, Truth]) -> Table:
    t = Table(title="quality: the same jobs under each policy")
    for col in ("policy", "succeeded", "ended at", "cost", "per 1,000 jobs", "true accuracy",
                "true agreement with opus", "run time"):
        t.add_column(col, justify="left" if col in ("policy", "ended at") else "right")
    for run in runs:
        tr = truths[run.policy]
        ended = ", ".join(f"{tier} {n:,}" for tier, n in sorted(run.tiers.items()))
        t.add_row(run.policy, f"{run.succeeded:,}/{run.jobs:,}", ended, _usd(run.cost_usd),
                  _usd(run.cost_usd * 1000 / run.jobs), f"{tr.accuracy:.1%}", f"{tr.agreement:.1%}",
                  f"{run.seconds:.0f} s")
    return t


def figures(runs: dict[str, Run], truths: dict[str, Truth], *, latency_ms: float) -> list[Figure]:
    seed, opus = runs["seed"], runs["all-opus"]
    q = seed.extra["quality"]
    common = {"jobs": seed.jobs, "latency_ms": latency_ms, "shadow_rate": SHADOW_RATE, "triage_noise": TRIAGE_NOISE,
              "error_rates": DEFAULT_ERROR_RATES,
              "runs": {r.policy: {"cost_usd": float(r.cost_usd), "seconds": r.seconds, "succeeded": r.succeeded,
                                  "tiers": r.tiers, "accuracy": truths[r.policy].accuracy,
                                  "agreement": truths[r.policy].agreement} for r in runs.values()}}
    out: list[Figure] = []
    true_agreement = truths["seed"].agreement
    if q.agreement is None:
        out.append(Figure(NAME, "seed: estimated agreement with opus (no shadow result)", 0.0, "",
                          target=1, target_kind=">=", note="no shadowed job was evaluated", extra=common))
    else:
        inside = q.agreement_low <= true_agreement <= q.agreement_high
        extra = {**common, "estimate": q.agreement, "low": q.agreement_low, "high": q.agreement_high,
                 "true_agreement": true_agreement, "shadowed": q.shadowed, "evaluated": q.evaluated,
                 "coverage": q.coverage, "evaluation_cost_usd": float(q.evaluation_cost_usd)}
        out.append(Figure(NAME, f"seed: estimated agreement with opus {q.agreement:.3f} "
                                f"[{q.agreement_low:.3f}, {q.agreement_high:.3f}] from {q.evaluated:,} shadowed "
                                f"(rate {SHADOW_RATE:g}); true {true_agreement:.3f}: "
                                f"{'inside' if inside else 'outside'} the 95% interval",
                          1.0 if inside else 0.0, "", target=1, target_kind=">=", extra=extra))
    per_k = Decimal(1000) / seed.jobs
    for name in ("seed", "cascade", "medium=opus", "all-sonnet"):
        run = runs[name]
        tr = truths[name]
        out.append(Figure(NAME, f"{name}: cost per 1,000 jobs (true accuracy {tr.accuracy:.1%}, "
                                f"agreement with opus {tr.agreement:.1%}; all-opus {truths['all-opus'].accuracy:.1%})",
                          float(run.cost_usd * per_k), "USD", baseline=float(opus.cost_usd * per_k),
                          baseline_name="all-opus", extra=common))
    for name, estimate in seed.extra["whatif"].items():
        out.append(_whatif_figure(name, estimate, runs[name], truths[name], extra=common))
    return out


def _whatif_figure(name: str, estimate: PolicyEstimate, actual: Run, true: Truth, *,
                   extra: dict[str, Any]) -> Figure:
    """Passes when the predicted cost is within COST_TOLERANCE of the run's and the predicted
    agreement within AGREEMENT_TOLERANCE of the run's true agreement with opus, over all the jobs:
    an agreement that leaves some out (a tier with no shadow result) is no prediction of the whole,
    however close it lands."""
    title = f"whatif from the seed run, {name}: predicted vs run"
    cost_error = abs(float(estimate.cost_usd) - float(actual.cost_usd)) / float(actual.cost_usd)
    agreement_error = None if estimate.agreement is None else abs(estimate.agreement - true.agreement)
    covered = estimate.coverage is not None and estimate.coverage >= 1
    ok = (cost_error <= COST_TOLERANCE and agreement_error is not None and agreement_error <= AGREEMENT_TOLERANCE
          and covered)
    detail = {**extra, "policy": describe(estimate.policy), "predicted_cost_usd": float(estimate.cost_usd),
              "actual_cost_usd": float(actual.cost_usd), "predicted_agreement": estimate.agreement,
              "true_agreement": true.agreement, "predicted_low": estimate.low, "predicted_high": estimate.high,
              "coverage": estimate.coverage, "thin": estimate.thin, "cost_error": cost_error,
              "agreement_error": agreement_error}
    predicted = "none" if estimate.agreement is None else f"{estimate.agreement:.3f}"
    coverage = "" if covered else (f", covering only {estimate.coverage:.0%} of the jobs"
                                   if estimate.coverage is not None else "")
    off = "—" if agreement_error is None else f"{100 * agreement_error:.1f} points"
    return Figure(NAME, f"{title}: cost {_usd(estimate.cost_usd)} vs {_usd(actual.cost_usd)} ({cost_error:.1%} off, "
                        f"target ≤ {COST_TOLERANCE:.0%}); agreement {predicted}{coverage} vs true "
                        f"{true.agreement:.3f} ({off}, target ≤ {100 * AGREEMENT_TOLERANCE:.0f})",
                  1.0 if ok else 0.0, "", target=1, target_kind=">=", extra=detail)


def run(*, quick: bool, console: Console, profile: bool = False, jobs: int | None = None,
        latency_ms: float | None = None, concurrency: int | None = None) -> list[Figure]:
    """``profile`` is not offered: the figures are accuracy and dollars, not time. ``concurrency``
    sets every queue's worker threads; by default each runs at its ``switchyard worker`` default."""
    n = jobs or (150 if quick else 3_000)
    latency = latency_ms if latency_ms is not None else 20.0
    work = workload(n)
    console.print(f"[bold]quality[/]: {n:,} jobs ({sum(j['kind'] == 'extract' for j in work):,} extract), fake "
                  f"latency {latency:.0f} ms, error rates 'default' ({rates_line()}), triage noise {TRIAGE_NOISE:g}; "
                  f"policies {', '.join(p.name for p in POLICIES)}")
    started = time.monotonic()
    runs: dict[str, Run] = {}
    with env.workdir() as workdir:
        whatif = {name: _config(next(p for p in POLICIES if p.name == name), workdir)[1].routing
                  for name in WHATIF_POLICIES}
        for policy in POLICIES:
            runs[policy.name] = measure(policy, work, workdir=workdir, latency_ms=latency, concurrency=concurrency,
                                        console=console, whatif=whatif)
    reference = runs["all-opus"].outputs
    truths = {name: truth(r, work, reference) for name, r in runs.items()}
    console.print(cost_quality_table(list(runs.values()), truths))
    q = runs["seed"].extra["quality"]
    console.print(f"  seed: switchyard quality estimates agreement {q.agreement} "
                  f"[{q.agreement_low}, {q.agreement_high}] from {q.evaluated:,} shadowed jobs (evaluation cost "
                  f"{_usd(q.evaluation_cost_usd)}); the truth: {truths['seed'].agreement:.4f}")
    console.print(f"  quality: {n:,} jobs x {len(POLICIES)} policies in {time.monotonic() - started:.0f} s")
    return figures(runs, truths, latency_ms=latency)
