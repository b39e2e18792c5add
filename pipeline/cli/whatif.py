"""`switchyard whatif` and `switchyard calibrate`: a batch's cost and agreement under other routing
policies, estimated from its records (pipeline.quality.whatif). Registered on the app when
pipeline.cli.app imports it."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from pipeline.cli.common import app, console, err
from pipeline.cli.history import JsonFlag, TenantOpt, _plain, _print_json, _session, _tenant_id
from pipeline.cli.tables import compact, new_table
from pipeline.config import DIFFICULTIES, ModelConfig, RoutingPolicy, load_config
from pipeline.quality.whatif import PolicyEstimate
from pipeline.queries import history

FIGURES = ("min conf", "cost", "vs now", "agreement", "95% interval", "covers", "thin")
BatchOpt = Annotated[str, typer.Option(help="The batch (name or id) whose records are re-priced.")]
EscalationOpt = Annotated[str | None, typer.Option(
    help="The escalation chain, cheapest first, such as haiku,sonnet,opus; the sweep maps onto its tiers.")]


@app.command()
def whatif(
    batch: BatchOpt,
    config: Annotated[Path | None, typer.Option(help="Take the policy asked for from this configuration's "
                                                    "[routing].")] = None,
    min_confidence: Annotated[float | None, typer.Option(help="Triage confidence under which a verdict is "
                                                               "ambiguous.")] = None,
    route: Annotated[list[str] | None, typer.Option(help="DIFFICULTY=TIER, such as medium=opus; repeat it.")]
    = None,
    escalation: EscalationOpt = None,
    show_all: Annotated[bool, typer.Option("--all", help="Every policy of the sweep, not only the cheapest for "
                                                         "their agreement.")] = False,
    tenant: TenantOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """What the batch's jobs would have cost, and their agreement with the reference tier, under
    another routing policy and over a sweep of policies, estimated from what was recorded (triage
    verdicts, calls and their costs, escalations, shadow results), with no model call."""
    from pipeline.cli.common import settings
    from pipeline.quality import whatif as w

    models = settings().models
    base = _other_routing(config) if config is not None else None
    asked = w.custom_policy(models, base=base, base_source=str(config) if config else None,
                            min_confidence=min_confidence, routes=route or [], escalation=escalation)
    with _session() as session:
        batch_id = history.find_batch(db_session=session, batch=batch, tenant_id=_tenant_id(session, tenant)).id
        estimator = w.estimator(session, batch_id=batch_id, models=models)
    current, wanted = estimator.estimate(models.routing), estimator.estimate(asked)
    swept = sorted((estimator.estimate(p) for p in w.policies(replace(models, routing=asked))),
                   key=lambda e: e.cost_usd)
    if as_json:
        _print_json({"batch": batch, "reference_tier": models.routing.reference,
                     "shadowed": estimator.records.shadowed, "current": _row(current, current, models),
                     "asked": _row(wanted, current, models), "sweep": [_row(e, current, models) for e in swept]})
        return
    shown = swept if show_all else _frontier(swept)
    marked = [current] if w.same_routing(wanted.policy, current.policy) else [current, wanted]
    rows = [*marked, *(e for e in shown if not any(w.same_routing(e.policy, m.policy) for m in marked))]
    rows.sort(key=lambda e: e.cost_usd)
    title = Text.assemble("cost against agreement with ", models.routing.reference, " (batch ", _plain(batch), ")")
    # The mapping in one narrow column, a letter a tier, so that the table fits a terminal.
    short = _short_names(models.tiers)
    table = new_table(("", "route", *FIGURES), figures=FIGURES, title=title)
    for e in rows:
        table.add_row(_mark(e, current, wanted), " ".join(short[t] for t in (
            *(e.policy.by_difficulty[d] for d in DIFFICULTIES), e.policy.ambiguous)), *_figures(e, current))
    console.print(table)
    console.print(f"route: the tiers of {', '.join(DIFFICULTIES)} and ambiguous jobs ("
                  + ", ".join(f"{short[t]} {t}" for t in models.tiers if short[t] != t) + ")", style="dim")
    console.print(f"escalation {' -> '.join(asked.escalation)} for the sweep, {' -> '.join(models.routing.escalation)} "
                  f"for the current policy; {len(swept)} policies swept, "
                  f"{'all shown' if show_all else 'shown: the cheapest for their agreement (--all: every one)'}",
                  style="dim")
    for name, e in (("current", current), ("asked", wanted)):
        if name == "asked" and w.same_routing(wanted.policy, current.policy):
            continue
        for note in e.thin:
            console.print(Text(f"{name}: thin: {note}"), style="dim")
    console.print(f"agreement: estimated from {estimator.records.shadowed:,} shadow result(s), 95% interval; cost: "
                  f"the jobs' own (triage, work, format checks), expected over escalations; thin: the cells it "
                  f"relies on with under {w.THIN_BELOW} shadow results, or borrowed figures; covers: the share of the "
                  f"succeeded jobs in strata with a shadow result (the rest are left out)", style="dim")


@app.command()
def calibrate(
    batch: BatchOpt,
    target: Annotated[float, typer.Option(help="The agreement with the reference tier to keep, such as 0.97.")],
    out: Annotated[Path | None, typer.Option(help="Write the configuration here (else to standard output).")]
    = None,
    escalation: EscalationOpt = None,
    tenant: TenantOpt = None,
) -> None:
    """The cheapest policy of whatif's sweep whose estimated agreement (the lower bound of its 95%
    interval) stays at or above the target, written as a whole configuration (the current one with
    [routing] replaced) to review and run with SWITCHYARD_CONFIG."""
    from pipeline.cli.common import settings
    from pipeline.cli.outfile import write_whole
    from pipeline.quality import whatif as w

    w.check_target(target)
    s = settings()
    models = s.models
    routing = w.custom_policy(models, escalation=escalation)
    with _session() as session:
        batch_id = history.find_batch(db_session=session, batch=batch, tenant_id=_tenant_id(session, tenant)).id
        estimator = w.estimator(session, batch_id=batch_id, models=models)
    current = estimator.estimate(models.routing)
    estimates = [current, *(estimator.estimate(p) for p in w.policies(replace(models, routing=routing)))]
    choice = w.choose(estimates, target=target, batch=batch, current=models.routing)
    chosen = choice.chosen
    comment = (f"Chosen by `switchyard calibrate --batch {batch} --target {target:g}` on "
               f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: estimated agreement with {models.routing.reference} "
               f"{chosen.agreement:.1%} (95% interval {chosen.low:.1%}-{chosen.high:.1%}), cost "
               f"${chosen.cost_usd:.4f} against ${current.cost_usd:.4f} recorded.")
    source = str(s.config_path) if s.config_path else "defaults.toml"
    text = (s.config_path.read_text() if s.config_path else
            resources.files("pipeline").joinpath("defaults.toml").read_text())
    written = w.with_routing(text, chosen.policy, comment=comment, source=str(out or source))
    if out is not None:
        with write_whole(out) as fh:
            fh.write(written)
    else:
        sys.stdout.write(written)
    report = console if out is not None else err
    report.print(Text(f"chosen: {w.describe(chosen.policy)}"))
    report.print(Text(f"  {_summary(chosen, current)}"))
    for note in chosen.thin:
        report.print(Text(f"  thin: {note}"), style="dim")
    for e in choice.runners_up:
        report.print(Text(f"runner-up: {w.describe(e.policy)}\n  {_summary(e, current)}"))
    if out is not None:
        report.print(Text(f"written to {out}: review it, then run every process with SWITCHYARD_CONFIG={out}"))


def _other_routing(path: Path) -> RoutingPolicy:
    return load_config(path).routing


def _summary(e: PolicyEstimate, current: PolicyEstimate) -> str:
    return (f"agreement {compact(e.agreement, 'pct')} (95% interval {compact(e.low, 'pct')}-{compact(e.high, 'pct')})"
            f", cost {compact(e.cost_usd, 'usd')} against {compact(current.cost_usd, 'usd')} recorded")


def _frontier(estimates: list[PolicyEstimate]) -> list[PolicyEstimate]:
    """The policies no cheaper one matches in agreement (point estimate), cheapest first. Only those
    whose agreement covers every job they route: one that leaves jobs out would look better than it is."""
    out: list[PolicyEstimate] = []
    best = -1.0
    for e in sorted(estimates, key=lambda e: (e.cost_usd, -(e.agreement or 0))):
        if e.agreement is not None and e.uncovered == 0 and e.agreement > best:
            out.append(e)
            best = e.agreement
    return out


def _short_names(tiers: Iterable[str]) -> dict[str, str]:
    """Each tier by its initial (haiku H, sonnet S, opus O), or by its name where initials clash."""
    names = list(tiers)
    initials = {t: t[:1].upper() for t in names}
    return initials if len(set(initials.values())) == len(names) else {t: t for t in names}


def _mark(e: PolicyEstimate, current: PolicyEstimate, asked: PolicyEstimate) -> Text:
    from pipeline.quality.whatif import same_routing

    marks = [name for name, m in (("current", current), ("asked", asked)) if same_routing(e.policy, m.policy)]
    return Text("=".join(marks), "bold")


def _figures(e: PolicyEstimate, current: PolicyEstimate) -> list[str]:
    interval = "-" if e.low is None or e.high is None else f"{e.low:.0%}–{e.high:.0%}"
    ratio = float(e.cost_usd / current.cost_usd) if current.cost_usd else None
    return [f"{e.policy.min_confidence:.2f}", compact(e.cost_usd, "usd"), compact(ratio, "pct"),
            compact(e.agreement, "pct"), interval, compact(e.coverage, "pct"), compact(len(e.thin)) if e.thin else ""]


def _row(e: PolicyEstimate, current: PolicyEstimate, models: ModelConfig) -> dict[str, Any]:
    from pipeline.quality.whatif import same_routing

    p = e.policy
    return {"easy": p.by_difficulty["easy"], "medium": p.by_difficulty["medium"], "hard": p.by_difficulty["hard"],
            "ambiguous": p.ambiguous, "min_confidence": p.min_confidence, "escalation": list(p.escalation),
            "current": same_routing(p, models.routing), "jobs": e.jobs, "cost_usd": f"{e.cost_usd:f}",
            "cost_ratio": float(e.cost_usd / current.cost_usd) if current.cost_usd else None,
            "agreement": e.agreement, "agreement_low": e.low, "agreement_high": e.high, "coverage": e.coverage,
            "thin": e.thin}
