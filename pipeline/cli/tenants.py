"""`switchyard serve`, `switchyard tokens ...` and `switchyard tenants ...`: the HTTP API and who
may use it."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Annotated

import typer
from rich.text import Text
from sqlalchemy.orm import Session, sessionmaker

from pipeline.cli.common import app, console, err
from pipeline.cli.tables import compact, new_table, when
from pipeline.errors import InvalidInput
from pipeline.settings import Settings

tokens_app = typer.Typer(no_args_is_help=True, help="API tokens: each belongs to a tenant; only its hash is stored.")
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants of the HTTP API and their limits.")
app.add_typer(tokens_app, name="tokens")
app.add_typer(tenants_app, name="tenants")

TenantOpt = Annotated[str, typer.Option("--tenant", help="The tenant's name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _sessions() -> sessionmaker[Session]:
    from pipeline.db import make_engine, session_factory

    return session_factory(make_engine(Settings().database_url, pool_size=1))


def _when(value: object) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""  # type: ignore[attr-defined]


OPERATORS_TENANT = "operators"  # an operator token's own tenant when --tenant is not given


@tokens_app.command("create")
def tokens_create(
    tenant: Annotated[str | None, typer.Option("--tenant", help="The tenant's name (optional with --operator).")
                      ] = None,
    operator: Annotated[bool, typer.Option(
        "--operator", help="An operator's token: it reads every tenant's jobs and batches (API and dashboard), "
                           f"and submits as its own tenant (default {OPERATORS_TENANT!r}).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a token for TENANT (created if new). The token is printed once and never stored."""
    from pipeline import tenants
    from pipeline.db import transaction

    if tenant is None and not operator:
        raise InvalidInput("tokens create needs --tenant NAME (or --operator for an operator's token)")
    with transaction(_sessions()) as session:
        new = tenants.create_token(session, tenant or OPERATORS_TENANT, operator=operator)
    if as_json:
        print(json.dumps({"tenant": new.tenant, "prefix": new.prefix, "token": new.token,
                          "created_at": _when(new.created_at), "operator": new.operator}))
        return
    role = "operator token" if new.operator else "token"
    err.print(f"{role} for tenant [bold]{new.tenant}[/] (prefix {new.prefix}); it is shown only this once:")
    print(new.token)


@tokens_app.command("list")
def tokens_list(tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's.")] = None,
                as_json: JsonOpt = False) -> None:
    """List tokens: prefix, tenant, created, revoked. Never the secret."""
    from pipeline import tenants

    with _sessions()() as session:
        rows = tenants.list_tokens(session, tenant)
    if as_json:
        print(json.dumps([{"tenant": t.tenant, "prefix": t.prefix, "created_at": _when(t.created_at),
                           "revoked_at": _when(t.revoked_at) or None, "operator": t.operator} for t in rows]))
        return
    table = new_table(("prefix", "tenant", "operator", "created", "revoked"), whole=("prefix", "created", "revoked"))
    for t in rows:
        table.add_row(t.prefix, Text(t.tenant), "yes" if t.operator else "", when(t.created_at), when(t.revoked_at))
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(prefix: Annotated[str, typer.Argument(help="The token's prefix (from `tokens list`).")],
                  tenant: TenantOpt, as_json: JsonOpt = False) -> None:
    """Revoke one of TENANT's tokens: requests with it get 401 from now on."""
    from pipeline import tenants
    from pipeline.db import transaction

    with transaction(_sessions()) as session:
        info = tenants.revoke_token(session, tenant, prefix)
    if as_json:
        print(json.dumps({"tenant": info.tenant, "prefix": info.prefix, "revoked_at": _when(info.revoked_at)}))
        return
    console.print(f"revoked token {info.prefix} of tenant {info.tenant} at {_when(info.revoked_at)}")


@tenants_app.command("list")
def tenants_list(as_json: JsonOpt = False) -> None:
    """List tenants with their limits (empty: no limit)."""
    from pipeline import tenants

    with _sessions()() as session:
        rows = [(t.name, t.max_jobs_in_flight, t.max_spend_per_day_usd, t.weight, t.created_at)
                for t in tenants.get_all(session)]
    if as_json:
        print(json.dumps([{"tenant": n, "max_jobs_in_flight": j, "max_spend_per_day_usd":
                           f"{s:f}" if s is not None else None, "weight": w, "created_at": _when(c)}
                          for n, j, s, w, c in rows]))
        return
    limits = ("max jobs in flight", "max spend per day", "weight")
    table = new_table(("tenant", *limits, "created"), figures=limits, whole=("created",))
    for n, j, s, w, c in rows:
        table.add_row(Text(n), "" if j is None else compact(j), "" if s is None else compact(s, "usd"), f"{w:g}",
                      when(c))
    console.print(table)


def _usd(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        usd = Decimal(value)
    except InvalidOperation:
        usd = Decimal("NaN")
    if not usd.is_finite():  # Decimal reads "NaN" and "Infinity" too
        raise InvalidInput(f"--spend-per-day {value!r} is not a number of dollars")
    return usd


NO_NEW_JOBS = "(it accepts no new jobs)"


def _jobs_limit(value: int | None) -> str:
    """A limit as stored, in words: what is enforced."""
    if value is None:
        return "unlimited"
    return f"at most 0 {NO_NEW_JOBS}" if value == 0 else f"at most {value:,}"


def _spend_limit(value: Decimal | None) -> str:
    if value is None:
        return "unlimited"
    if value == 0:
        return f"at most $0 {NO_NEW_JOBS}"
    # Dollars to as many places as the limit has (up to the column's 8), and at least cents.
    cents = value.quantize(Decimal("0.01"))
    return f"at most ${cents if cents == value else value.normalize():,f}"


@tenants_app.command("limits")
def tenants_limits(
    name: Annotated[str, typer.Argument(help="The tenant.")],
    jobs_in_flight: Annotated[int | None, typer.Option(help="Most jobs queued or running at once; 0 accepts no new "
                                                            "jobs.")] = None,
    spend_per_day: Annotated[str | None, typer.Option(help="Most USD of model calls per UTC day, to 8 decimal places; "
                                                           "0 accepts no new jobs.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove both limits first.")] = False,
    weight: Annotated[float | None, typer.Option(
        help="The tenant's weight in the dispatcher's round robin: against the other tenants with queued jobs at "
             "the same priority, its share of the jobs in flight is in proportion to it (1 by default).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a tenant's limits, enforced when it submits work (429 with the numbers), and its weight
    in the dispatcher's round robin. A limit of 0 accepts no new jobs; --clear removes them. Prints
    the limits as stored."""
    from pipeline import tenants
    from pipeline.db import transaction

    with transaction(_sessions()) as session:
        t = tenants.set_limits(session, name, max_jobs_in_flight=jobs_in_flight,
                               max_spend_per_day_usd=_usd(spend_per_day), clear=clear, weight=weight)
        out = {"tenant": t.name, "max_jobs_in_flight": t.max_jobs_in_flight,
               "max_spend_per_day_usd": f"{t.max_spend_per_day_usd:f}" if t.max_spend_per_day_usd is not None
               else None, "weight": t.weight}
    if as_json:
        print(json.dumps(out))
        return
    console.print(f"tenant {t.name}: jobs in flight {_jobs_limit(t.max_jobs_in_flight)}, "
                  f"spend per day {_spend_limit(t.max_spend_per_day_usd)}, weight {t.weight:g}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the HTTP API (OpenAPI document at /docs and /openapi.json) and the dashboard (/ui)."""
    import uvicorn

    s = Settings()  # fail here, in one sentence, on a bad environment
    err.print(f"switchyard API: {s.connects_to()}", markup=False, highlight=False, soft_wrap=True)
    uvicorn.run("pipeline.api.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, proxy_headers=False)
