"""What every command module shares: the Typer app and its groups, the consoles, settings, and
the summary that `demo`, `enqueue --wait` and `stats` print. Command modules import from here and
register on ``app``; pipeline.cli.app imports them all, so nothing here imports a command module."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from pipeline.cli.tables import compact, cost_line, new_table
from pipeline.names import escaped
from pipeline.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Route bulk Claude work between Haiku, Sonnet and Opus.")
db_app = typer.Typer(no_args_is_help=True, help="The database schema (Alembic migrations).")
jobs_app = typer.Typer(no_args_is_help=True, help="Job history.")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
# No no_args_is_help: on its own, `switchyard batches` lists them (pipeline.cli.history); its
# commands act on one batch (pipeline.cli.budgets: budget, resume).
batches_app = typer.Typer(help="Batches: list them; set a batch's budget; resume its paused jobs.")
app.add_typer(batches_app, name="batches")

console = Console()
# Errors are one sentence on one line, however narrow the terminal: scripts grep them.
err = Console(stderr=True)


def settings() -> Settings:
    return Settings()


def print_summary(summary: Any) -> None:
    figures = ("jobs ended here", "calls", "input tokens", "output tokens", "cost")
    table = new_table(("tier", *figures), figures=figures, title="Routing summary")
    for t in summary.tiers:
        table.add_row(t.tier, compact(t.jobs), compact(t.calls), compact(t.input_tokens), compact(t.output_tokens),
                      compact(t.cost_usd, "usd"))
    table.add_row(Text("total", "bold"), compact(summary.jobs), compact(sum(t.calls for t in summary.tiers)),
                  compact(sum(t.input_tokens for t in summary.tiers)),
                  compact(sum(t.output_tokens for t in summary.tiers)), Text(compact(summary.cost_usd, "usd"), "bold"))
    console.print(table)
    statuses = ", ".join(f"{k} {compact(v)}" for k, v in sorted(summary.by_status.items()))
    console.print(f"jobs: {compact(summary.jobs)} ({statuses})")
    console.print(f"escalations: {compact(summary.escalations)}   "
                  f"validation failures: {compact(summary.validation_failures)}")
    console.print(cost_line(summary))
    if summary.failure_reasons:
        console.print(failure_view(summary.failure_reasons, failed=summary.by_status.get("failed", 0)))


def failure_view(reasons: Any, *, failed: int) -> Text:
    """The most common failure reasons with their counts (report.failure_reasons), for every
    summary: `demo`, `enqueue --wait` and `stats`. Text, not markup: a reason may hold brackets."""
    lines = [Text("failed, the most common reasons first:")]
    lines += [Text(f"  {compact(r.jobs):>7}  {escaped(r.reason)}") for r in reasons]
    rest = failed - sum(r.jobs for r in reasons)
    if rest > 0:
        lines.append(Text(f"  {compact(rest):>7}  for other reasons (`switchyard jobs list --status failed`)"))
    return Text("\n").join(lines)
