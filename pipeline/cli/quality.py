"""`switchyard quality`: what routing costs in quality, from shadow evaluation
(pipeline.queries.quality). Registered on the app when pipeline.cli.app imports it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from pipeline.cli.common import app, console
from pipeline.cli.history import JsonFlag, TenantOpt, _plain, _print_json, _session, _tenant_id
from pipeline.cli.tables import compact, new_table
from pipeline.queries import history
from pipeline.queries.quality import Line, Quality

# "agreed" is out of the shadows compared: a shadow still on its way, or failed, has no verdict.
FIGURES = ("jobs", "shadowed", "agreed", "agreement", "95% interval", "cost/job")


@app.command()
def quality(
    batch: Annotated[str | None, typer.Option(help="Only this batch (name or id).")] = None,
    task: Annotated[str | None, typer.Option(help="Only the jobs of this task (every version).")] = None,
    since: Annotated[str | None, typer.Option(help="Jobs created at or after: ISO 8601, or an age like 6h, 2d.")]
    = None,
    tenant: TenantOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Agreement of routed answers with the reference tier's, from shadow evaluation: per final
    tier and triage difficulty, and estimated over all the jobs, with the cost against sending every
    job to the reference tier and what the evaluation cost."""
    from pipeline.cli.common import settings
    from pipeline.queries.quality import quality as measure

    s = settings()
    with _session() as session:
        tenant_id = _tenant_id(session, tenant)
        batch_id = history.find_batch(db_session=session, batch=batch, tenant_id=tenant_id).id if batch else None
        q = measure(session, s.models, batch_id=batch_id, task=task, tenant_id=tenant_id,
                    since=history.parse_time(since, option="--since") if since else None)
    if as_json:
        _print_json(q.to_dict())
        return
    title = Text.assemble(f"agreement with {q.reference_tier}", *((" (batch ", _plain(batch), ")") if batch else ()),
                          *((" (task ", _plain(task), ")") if task else ()))
    table = new_table(("tier", "difficulty", *FIGURES), figures=FIGURES, title=title)
    for line in q.strata:
        table.add_row(line.tier, line.difficulty or "", *_figures(line))
    for line in q.tiers:
        table.add_row(Text(line.tier, "bold"), Text("all", "bold"), *_figures(line))
    console.print(table)
    console.print(_overall(q))
    for note in q.notes:
        console.print(note, style="dim")
    console.print("agreed: out of the shadowed jobs compared so far; the interval: 95% Wilson", style="dim")


def _figures(line: Line) -> list[str]:
    interval = line.interval
    shown = "-" if interval is None else f"{interval.low:.0%}–{interval.high:.0%}"
    return [compact(line.jobs), "-" if line.reference else compact(line.shadowed),
            "-" if line.reference else f"{compact(line.agreed)}/{compact(line.evaluated)}",
            compact(line.agreement, "pct"), shown,
            compact(line.cost_per_job, "usd")]


def _overall(q: Quality) -> str:
    if q.agreement is None or q.agreement_low is None or q.agreement_high is None:
        agreement = "agreement with the reference: not estimated (no shadowed job has a result)"
    else:
        agreement = (f"estimated agreement with {q.reference_tier}: {q.agreement:.1%} "
                     f"(95% interval {q.agreement_low:.1%}–{q.agreement_high:.1%}), "
                     f"from {q.evaluated:,} shadowed job(s) of {q.succeeded:,} succeeded")
    saving = q.reference_cost_usd - q.cost_usd
    return (f"{agreement}\ncost: {compact(q.cost_usd, 'usd')} routed, against {compact(q.reference_cost_usd, 'usd')} "
            f"sending every job to {q.reference_tier}: saved {compact(saving, 'usd')}; evaluation cost "
            f"{compact(q.evaluation_cost_usd, 'usd')} (not in the jobs' cost)")
