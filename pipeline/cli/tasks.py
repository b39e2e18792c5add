"""`switchyard tasks ...`: the operator's named, versioned task definitions (pipeline.intake.tasks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from pipeline.cli.common import app, console, settings
from pipeline.cli.tables import new_table, when
from pipeline.errors import InputFileError, JobInputError

tasks_app = typer.Typer(no_args_is_help=True, help="Tasks: instructions, labels, examples and schemas that a batch "
                                                   "of jobs shares, named and versioned.")
app.add_typer(tasks_app, name="tasks")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="A tenant's tasks (those its jobs can name), not "
                                                                "the operator's own.")]


def _tenant_id(session: Any, tenant: str | None) -> int | None:
    from pipeline import tenants

    return None if tenant is None else tenants.require(session, tenant).id


def _sessions() -> Any:
    from pipeline.db import make_engine, session_factory

    return session_factory(make_engine(settings().database_url, pool_size=1))


@tasks_app.command("apply")
def tasks_apply(file: Annotated[Path, typer.Argument(help="The task's TOML file.")], tenant: TenantOpt = None,
                as_json: JsonOpt = False) -> None:
    """Store the task in FILE: its first version, or a new version if its content changed since the
    latest; the same content again adds nothing. Says which happened."""
    from pipeline.db import transaction
    from pipeline.intake import tasks

    s = settings()
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {file}: {exc.strerror}") from None
    try:
        spec = tasks.parse_task(tasks.read_toml(raw), work_tiers=s.models.work_tiers)
    except JobInputError as exc:
        raise JobInputError(f"{file}: {exc}") from None
    with transaction(_sessions()) as session:
        result = tasks.apply(session, spec, tenant_id=_tenant_id(session, tenant))
    if as_json:
        print(json.dumps({"task": result.name, "version": result.version, "created": result.created,
                          "content_sha256": result.content_sha256}))
        return
    if result.created:
        what = "created" if result.version == 1 else "new version"
        console.print(Text(f"task {result.name}: {what} {result.version}"))
    else:
        console.print(Text(f"task {result.name}: unchanged, still version {result.version}"))


@tasks_app.command("list")
def tasks_list(tenant: TenantOpt = None, as_json: JsonOpt = False) -> None:
    """The operator's tasks (or a tenant's), each at its latest version."""
    from pipeline.intake import tasks

    with _sessions()() as session:
        rows = tasks.get_all(session, tenant_id=_tenant_id(session, tenant))
    if as_json:
        print(json.dumps([{"task": t.name, "version": t.version, "kind": t.kind,
                           "created_at": t.created_at.isoformat(timespec="seconds")} for t in rows]))
        return
    table = new_table(("task", "version", "kind", "created"), figures=("version",), whole=("created",))
    for t in rows:
        table.add_row(Text(t.name), str(t.version), t.kind, when(t.created_at))
    console.print(table)


@tasks_app.command("show")
def tasks_show(name: Annotated[str, typer.Argument(help="The task's name.")],
               version: Annotated[int | None, typer.Option(min=1, help="This version; default: the latest.")] = None,
               tenant: TenantOpt = None, as_json: JsonOpt = False) -> None:
    """One version of a task, with its whole definition."""
    from pipeline.intake import tasks

    with _sessions()() as session:
        t = tasks.get(session, name, tenant_id=_tenant_id(session, tenant), version=version)
    out = {"task": t.name, "version": t.version, "kind": t.kind, "content_sha256": t.content_sha256,
           "created_at": t.created_at.isoformat(timespec="seconds"), "definition": t.definition}
    if as_json:
        print(json.dumps(out, ensure_ascii=False))
        return
    console.print(Text(f"task {t.name}, version {t.version} ({t.kind}), created {when(t.created_at)}"))
    print(json.dumps(t.definition, indent=2, ensure_ascii=False))
