"""`--tenant` on `switchyard enqueue` and on every lookup by batch name, through the real entry point
(this folder's `sy` fixture) on the real Postgres. Batch names are unique per tenant only, so a
name the operator types may be held by several batches: one batch holding it resolves, several are
an error naming each, and `--tenant` (or the batch id) says which. A tenant's enqueue is held to
its limits as its API submissions are."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Batch, Job, JobStatus, Tenant
from tests.history.helpers import job_line, write_jsonl

Sy = Callable[..., tuple[int, str, str]]
SyJson = Callable[..., Any]


def one_sentence(code: int, out: str, err: str) -> str:
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    return " ".join(err.removeprefix("error: ").split())


def jobs_file(path: Path, prefix: str, n: int) -> Path:
    return write_jsonl(path, [{**job_line(i), "key": f"{prefix}-{i}"} for i in range(n)])


def batches_named(sessions: sessionmaker[Session], name: str) -> list[tuple[int, str | None, int]]:
    """(id, tenant, jobs) of every batch called ``name``, oldest first."""
    with sessions() as s:
        return [(r.id, r.tenant, r.jobs) for r in s.execute(
            select(Batch.id, Tenant.name.label("tenant"), func.count(Job.id).label("jobs"))
            .outerjoin(Tenant, Tenant.id == Batch.tenant_id).outerjoin(Job, Job.batch_id == Batch.id)
            .where(Batch.name == name).group_by(Batch.id, Tenant.name).order_by(Batch.id))]


@pytest.fixture
def names(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """Two tenants and a batch name of this test's own (the module's tests share a database)."""
    base = f"t{abs(hash(request.node.name)) % 10**8}"
    return f"{base}-a", f"{base}-b", f"shared-{base}"


@pytest.fixture
def shared(sy: Sy, sy_json: SyJson, names: tuple[str, str, str], tmp_path: Path) -> dict[str | None, int]:
    """One batch name held three times: by no tenant (enqueued without --tenant), by tenant A and
    by tenant B, with one, two and three jobs keyed by their owner. Owner -> batch id."""
    a, b, name = names
    for tenant in (a, b):
        assert sy("tokens", "create", "--tenant", tenant)[0] == 0
    ids: dict[str | None, int] = {}
    for owner, n in ((None, 1), (a, 2), (b, 3)):
        path = jobs_file(tmp_path / f"{owner or 'none'}.jsonl", owner or "none", n)
        out = sy_json("enqueue", str(path), "--batch", name, *(("--tenant", owner) if owner else ()))
        assert (out["accepted"], out["tenant"]) == (n, owner)
        ids[owner] = out["batch_id"]
    return ids


def test_enqueue_with_tenant_makes_or_adds_to_that_tenants_batch(
        sy_json: SyJson, history_sessions: sessionmaker[Session], shared: dict[str | None, int],
        names: tuple[str, str, str], tmp_path: Path) -> None:
    a, b, name = names
    assert batches_named(history_sessions, name) == [(shared[None], None, 1), (shared[a], a, 2), (shared[b], b, 3)]
    again = sy_json("enqueue", str(jobs_file(tmp_path / "more.jsonl", a, 4)), "--batch", name, "--tenant", a)
    assert (again["batch_id"], again["accepted"], again["duplicates"]) == (shared[a], 2, 2)
    assert batches_named(history_sessions, name) == [(shared[None], None, 1), (shared[a], a, 4), (shared[b], b, 3)]


@pytest.mark.parametrize("command", [
    ["jobs", "list", "--batch", "{name}"],
    ["jobs", "show", "none-0", "--batch", "{name}"],
    ["stats", "--batch", "{name}"],
    ["export", "{name}"],
    ["cancel", "{name}"],
])
def test_a_name_several_batches_hold_is_an_error_listing_them(sy: Sy, history_sessions: sessionmaker[Session],
                                                              shared: dict[str | None, int],
                                                              names: tuple[str, str, str],
                                                              command: list[str]) -> None:
    a, b, name = names
    message = one_sentence(*sy(*(arg.format(name=name) for arg in command)))
    assert message.startswith(f"batch name '{name}' is held by 3 batches: "), message
    for owner, shown in ((None, "no tenant"), (a, f"tenant {a}"), (b, f"tenant {b}")):
        assert f"id {shared[owner]} ({shown}, created 20" in message, message
    assert message.endswith("pass --tenant NAME, or the batch id instead of the name"), message
    with history_sessions() as s:  # not even `cancel` touched one of them
        assert s.scalar(select(func.count()).select_from(Batch)
                        .where(Batch.id.in_(shared.values()), Batch.cancelled_at.is_not(None))) == 0
        assert set(s.scalars(select(Job.status).where(Job.batch_id.in_(shared.values())))) == {JobStatus.QUEUED}


def test_tenant_picks_its_own_batch_of_a_shared_name(sy: Sy, sy_json: SyJson, history_sessions: sessionmaker[Session],
                                                     shared: dict[str | None, int],
                                                     names: tuple[str, str, str]) -> None:
    a, b, name = names
    listed = sy_json("jobs", "list", "--batch", name, "--tenant", a)["jobs"]
    assert sorted(j["key"] for j in listed) == [f"{a}-0", f"{a}-1"]
    assert sy_json("jobs", "show", f"{a}-1", "--batch", name, "--tenant", a)["job"]["key"] == f"{a}-1"
    assert one_sentence(*sy("jobs", "show", "none-0", "--batch", name, "--tenant", a)) == \
        f"batch '{name}' has no job with key 'none-0'"
    assert sy_json("stats", "--batch", name, "--tenant", b)["jobs"] == 3
    code, out, err = sy("export", name, "--tenant", b)
    assert code == 0, err
    assert [json.loads(line)["key"] for line in out.splitlines()] == [f"{b}-0", f"{b}-1", f"{b}-2"]

    cancelled = sy_json("cancel", name, "--tenant", a)
    assert (cancelled["batch_id"], cancelled["cancelled"]) == (shared[a], 2)
    with history_sessions() as s:
        statuses = set(s.execute(select(Job.batch_id, Job.status).where(Job.batch_id.in_(shared.values()))))
    assert statuses == {(shared[None], JobStatus.QUEUED), (shared[a], JobStatus.CANCELLED),
                        (shared[b], JobStatus.QUEUED)}

    # `batches --tenant` lists that tenant's batches only; every listing names each batch's tenant.
    assert [(r["id"], r["tenant"]) for r in sy_json("batches", "--tenant", b)] == [(shared[b], b)]
    every = {r["id"]: r["tenant"] for r in sy_json("batches")}
    assert {i: every[i] for i in shared.values()} == {shared[None]: None, shared[a]: a, shared[b]: b}
    code, table, err = sy("batches")
    assert code == 0, err
    assert a in table and b in table


def test_a_name_one_batch_holds_needs_no_tenant_and_an_id_still_works(
        sy: Sy, sy_json: SyJson, shared: dict[str | None, int], names: tuple[str, str, str], tmp_path: Path) -> None:
    a, b, _ = names
    only = f"only-{a}"
    sy_json("enqueue", str(jobs_file(tmp_path / "only.jsonl", "only", 2)), "--batch", only, "--tenant", a)
    assert len(sy_json("jobs", "list", "--batch", only)["jobs"]) == 2
    assert sy_json("stats", "--batch", only)["jobs"] == 2
    # --tenant looks in that tenant's batches only, by name and by id.
    assert one_sentence(*sy("jobs", "list", "--batch", only, "--tenant", b)) == \
        f"no batch named '{only}' (`switchyard batches` lists them)"
    assert one_sentence(*sy("export", str(shared[a]), "--tenant", b)).startswith(f"no batch named '{shared[a]}'")

    # The id of each of the shared name's batches, no tenant's included, picks it.
    assert [j["key"] for j in sy_json("jobs", "list", "--batch", str(shared[None]))["jobs"]] == ["none-0"]
    assert sy_json("stats", "--batch", str(shared[b]))["jobs"] == 3
    assert sy_json("jobs", "show", "none-0", "--batch", str(shared[None]))["job"]["key"] == "none-0"
    assert sy_json("cancel", str(shared[None]))["cancelled"] == 1
    code, out, err = sy("export", str(shared[a]), "--tenant", a)
    assert code == 0, err
    assert len(out.splitlines()) == 2


def test_a_tenant_that_does_not_exist_is_refused(sy: Sy, history_sessions: sessionmaker[Session],
                                                 names: tuple[str, str, str], tmp_path: Path) -> None:
    """Not made on the fly: a mistyped name would get a tenant with no limits and no token."""
    a, _, name = names
    path = jobs_file(tmp_path / "jobs.jsonl", "k", 2)
    said = (f"no tenant called '{a}': `switchyard tenants list` lists them, and `switchyard tokens create --tenant "
            f"{a}` makes one")
    assert one_sentence(*sy("enqueue", str(path), "--batch", name, "--tenant", a)) == said
    for command in (["batches"], ["jobs", "list"], ["stats"], ["export", name], ["cancel", name]):
        assert one_sentence(*sy(*command, "--tenant", a)) == said, command
    with history_sessions() as s:
        assert s.scalar(select(func.count()).select_from(Tenant).where(Tenant.name == a)) == 0
    assert batches_named(history_sessions, name) == []


def test_tenant_limits_hold_for_a_cli_enqueue(sy: Sy, sy_json: SyJson, history_sessions: sessionmaker[Session],
                                              names: tuple[str, str, str], tmp_path: Path) -> None:
    """The checks of an API submission: jobs in flight counted with the new ones, in the same
    transaction as their writing (so a refused enqueue leaves nothing, --skip-invalid or not), and
    the day's spend."""
    a, _, _ = names
    assert sy("tokens", "create", "--tenant", a)[0] == 0
    assert sy("tenants", "limits", a, "--jobs-in-flight", "5")[0] == 0
    four = jobs_file(tmp_path / "four.jsonl", "l1", 4)
    assert sy_json("enqueue", str(four), "--batch", "l1", "--tenant", a)["accepted"] == 4

    over = (f"tenant '{a}' would have 6 jobs in flight with these 2 new ones, over its limit of 5 (4 already "
            f"queued or running); retry when some have finished")
    two = jobs_file(tmp_path / "two.jsonl", "l2", 2)
    assert one_sentence(*sy("enqueue", str(two), "--batch", "l2", "--tenant", a)) == over
    with_bad = tmp_path / "with-bad.jsonl"
    with_bad.write_text(two.read_text() + "not json\n")
    assert one_sentence(*sy("enqueue", str(with_bad), "--batch", "l2", "--tenant", a, "--skip-invalid")) == over
    assert batches_named(history_sessions, "l2") == []
    assert not (tmp_path / "with-bad.jsonl.invalid.jsonl").exists()

    # Keys the batch has are not new work; the same file without --tenant is the operator's own.
    assert sy_json("enqueue", str(four), "--batch", "l1", "--tenant", a)["duplicates"] == 4
    assert sy_json("enqueue", str(two), "--batch", "l2")["tenant"] is None
    assert [(t, n) for _, t, n in batches_named(history_sessions, "l2")] == [(None, 2)]

    # Under the limit, a --skip-invalid enqueue keeps its good lines and reports the bad one.
    assert sy("tenants", "limits", a, "--jobs-in-flight", "6")[0] == 0
    out = sy_json("enqueue", str(with_bad), "--batch", "l2", "--tenant", a, "--skip-invalid")
    assert (out["accepted"], out["invalid"]) == (2, 1)
    assert [(t, n) for _, t, n in batches_named(history_sessions, "l2")] == [(None, 2), (a, 2)]

    assert sy("tenants", "limits", a, "--clear", "--spend-per-day", "0")[0] == 0
    assert one_sentence(*sy("enqueue", str(two), "--batch", "l3", "--tenant", a)) == \
        f"tenant '{a}' accepts no new jobs: its daily spend limit is $0"
    assert batches_named(history_sessions, "l3") == []
