"""`switchyard batches budget` and `switchyard batches resume`: a batch's spending cap, and its jobs
paused for it (pipeline.flow.budgets). Registered on the app when pipeline.cli.app imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from pipeline.cli.common import batches_app, console
from pipeline.cli.tables import compact

if TYPE_CHECKING:  # the flow is imported by the commands that use it, not at start-up
    from pipeline.flow.budgets import BudgetState

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a sentence.")]
TenantOpt = Annotated[str | None, typer.Option(
    "--tenant", help="The tenant whose batch this is, when several batches have the name.")]


def budget_line(state: BudgetState | None) -> Text | str:
    """Under a batch's name in `switchyard batches`: its budget, spent and reserved, and its paused jobs."""
    if state is None or (state.budget_usd is None and not state.paused):
        return ""
    line = Text("\nbudget ")
    if state.budget_usd is None:
        line.append("none")
    else:
        line.append(f"{compact(state.budget_usd, 'usd')}: spent {compact(state.spent_usd, 'usd')}, reserved "
                    f"{compact(state.reserved_usd, 'usd')}")
    if state.paused:
        line.append(f"; {compact(state.paused)} paused", style="yellow")
        if state.exhausted:
            line.append(" (exhausted)", style="yellow")
    return line


def _print(state: BudgetState, as_json: bool, what: str) -> None:
    from pipeline.queries import history

    if as_json:
        console.print_json(data=history.jsonable(state.as_dict()))
        return
    console.print(Text.assemble("batch ", (state.batch, "bold"), f": {what}", budget_line(state)))


@batches_app.command("budget")
def budget(
    batch: Annotated[str, typer.Argument(help="Batch name (or id).")],
    usd: Annotated[str, typer.Option("--usd", help="The new budget in USD (0 or more): raised, the jobs paused "
                                                   "for it resume at the dispatcher's next tick.")],
    tenant: TenantOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a batch's spending cap. Its calls reserve their worst-case cost against it before they are
    made, so the batch's spend never goes over it; jobs that do not fit pause until it has room."""
    from pipeline.cli.history import _session, _tenant_id
    from pipeline.flow import budgets
    from pipeline.queries import history

    amount = budgets.check_budget(usd, where="--usd")
    with _session() as session:
        b = history.find_batch(db_session=session, batch=batch, tenant_id=_tenant_id(session, tenant))
        budgets.set_budget(session, b.id, amount)
        session.commit()
        state = budgets.states(session, [b.id])[b.id]
    _print(state, as_json, f"budget set to {compact(amount, 'usd')}")


@batches_app.command("resume")
def resume(
    batch: Annotated[str, typer.Argument(help="Batch name (or id).")],
    tenant: TenantOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move a batch's paused jobs back to where they were. A job that still does not fit its budget
    pauses again at its next call: raise the budget first (`switchyard batches budget`)."""
    from pipeline.cli.history import _session, _tenant_id
    from pipeline.flow import budgets
    from pipeline.queries import history

    with _session() as session:
        b = history.find_batch(db_session=session, batch=batch, tenant_id=_tenant_id(session, tenant))
        resumed = budgets.resume_batch(session, b.id, b.name)
        session.commit()
        state = budgets.states(session, [b.id])[b.id]
    _print(state, as_json, f"{resumed:,} paused job(s) resume at the dispatcher's next tick")
