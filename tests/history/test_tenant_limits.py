"""`switchyard tenants limits` and the token commands, run in-process through the real entry
point (this folder's `sy` fixture) on a database of this module's own: a value the columns cannot
hold is one sentence and exit 2, and what is printed is what is stored and enforced."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Tenant

Sy = Callable[..., tuple[int, str, str]]


@pytest.fixture
def tenant(sy: Sy, request: pytest.FixtureRequest) -> str:
    name = f"t{abs(hash(request.node.name)) % 10**8}"
    code, _out, err = sy("tokens", "create", "--tenant", name, "--json")
    assert code == 0, err
    return name


def stored(history_sessions: sessionmaker[Session], name: str) -> tuple[int | None, Decimal | None]:
    with history_sessions() as s:
        row = s.execute(select(Tenant.max_jobs_in_flight, Tenant.max_spend_per_day_usd)
                        .where(Tenant.name == name)).one()
    return row.max_jobs_in_flight, row.max_spend_per_day_usd


def one_sentence(err: str) -> str:
    assert err.startswith("error: "), err
    assert "Traceback" not in err and "SELECT" not in err and "UPDATE" not in err, err
    return " ".join(err.removeprefix("error: ").split())


@pytest.mark.parametrize(("args", "message"), [
    (["--jobs-in-flight", "2147483648"], "--jobs-in-flight 2,147,483,648 is over the largest limit, 2,147,483,647"),
    (["--jobs-in-flight", "99999999999999999999999"], "--jobs-in-flight 99,999,999,999,999,999,999,999 is over the "
                                                      "largest limit, 2,147,483,647"),
    (["--jobs-in-flight", "-1"], "--jobs-in-flight must be 0 or more"),
    (["--spend-per-day", "NaN"], "--spend-per-day 'NaN' is not a number of dollars"),
    (["--spend-per-day", "sNaN"], "--spend-per-day 'sNaN' is not a number of dollars"),
    (["--spend-per-day", "Infinity"], "--spend-per-day 'Infinity' is not a number of dollars"),
    (["--spend-per-day", "-inf"], "--spend-per-day '-inf' is not a number of dollars"),
    (["--spend-per-day", "1e100"], "--spend-per-day must be under $1,000,000 a day"),
    (["--spend-per-day", "1000000"], "--spend-per-day must be under $1,000,000 a day"),
    (["--spend-per-day", "-0.01"], "--spend-per-day must be 0 or more"),
    (["--spend-per-day", "0.0000000001"], "--spend-per-day 0.0000000001 has more than 8 decimal places; limits are "
                                          "kept to $0.00000001"),
    (["--spend-per-day", "1e-999999"], "--spend-per-day 1E-999999 has more than 8 decimal places; limits are kept "
                                       "to $0.00000001"),
    (["--spend-per-day", "0.123456789"], "--spend-per-day 0.123456789 has more than 8 decimal places; limits are "
                                         "kept to $0.00000001"),
])
def test_a_limit_the_column_cannot_hold_is_one_sentence(sy: Sy, history_sessions: sessionmaker[Session], tenant: str,
                                                        args: list[str], message: str) -> None:
    assert sy("tenants", "limits", tenant, "--jobs-in-flight", "7", "--spend-per-day", "1.5")[0] == 0
    code, out, err = sy("tenants", "limits", tenant, *args)
    assert code == 2, (out, err)
    assert one_sentence(err) == message
    assert stored(history_sessions, tenant) == (7, Decimal("1.5"))


@pytest.mark.parametrize(("args", "shown", "as_json", "kept"), [
    (["--jobs-in-flight", "0"], "jobs in flight at most 0 (it accepts no new jobs), spend per day unlimited",
     {"max_jobs_in_flight": 0, "max_spend_per_day_usd": None}, (0, None)),
    (["--spend-per-day", "0"], "jobs in flight unlimited, spend per day at most $0 (it accepts no new jobs)",
     {"max_jobs_in_flight": None, "max_spend_per_day_usd": "0.00000000"}, (None, Decimal(0))),
    (["--spend-per-day", "-0"], "jobs in flight unlimited, spend per day at most $0 (it accepts no new jobs)",
     {"max_jobs_in_flight": None, "max_spend_per_day_usd": "0.00000000"}, (None, Decimal(0))),
    (["--jobs-in-flight", "2147483647", "--spend-per-day", "999999.99999999"],
     "jobs in flight at most 2,147,483,647, spend per day at most $999,999.99999999",
     {"max_jobs_in_flight": 2147483647, "max_spend_per_day_usd": "999999.99999999"},
     (2147483647, Decimal("999999.99999999"))),
    (["--spend-per-day", "0.00000001"], "jobs in flight unlimited, spend per day at most $0.00000001",
     {"max_jobs_in_flight": None, "max_spend_per_day_usd": "0.00000001"}, (None, Decimal("0.00000001"))),
    (["--jobs-in-flight", "1500", "--spend-per-day", "12.5"], "jobs in flight at most 1,500, spend per day at most "
                                                              "$12.50",
     {"max_jobs_in_flight": 1500, "max_spend_per_day_usd": "12.50000000"}, (1500, Decimal("12.5"))),
])
def test_what_is_printed_is_what_is_stored(sy: Sy, history_sessions: sessionmaker[Session], tenant: str,
                                           args: list[str], shown: str, as_json: dict[str, Any],
                                           kept: tuple[int | None, Decimal | None]) -> None:
    code, out, err = sy("tenants", "limits", tenant, *args)
    assert code == 0, err
    assert " ".join(out.split()) == f"tenant {tenant}: {shown}, weight 1"  # the round robin's weight: unchanged
    assert stored(history_sessions, tenant) == kept
    code, out, err = sy("tenants", "limits", tenant, "--clear", *args, "--json")
    assert code == 0, err
    assert json.loads(out) == {"tenant": tenant, **as_json, "weight": 1.0}


@pytest.mark.parametrize("args", [
    ["tenants", "limits", "\udcff", "--jobs-in-flight", "1"],  # what Python makes of the byte 0xff in argv
    ["tokens", "list", "--tenant", "\udcff"],
    ["tokens", "create", "--tenant", "\udcff"],
])
def test_a_tenant_name_that_cannot_exist_is_one_sentence(sy: Sy, args: list[str]) -> None:
    code, _out, err = sy(*args)
    assert code == 2, err
    assert one_sentence(err) == "tenant name '\\udcff' must be 1-100 letters, digits, '.', '_' or '-'"


def test_a_token_prefix_that_cannot_exist_is_one_sentence(sy: Sy, tenant: str) -> None:
    for prefix, shown in (("\udcff", "'\\udcff'"), ("x" * 5000, "'" + "x" * 56 + "...")):
        code, _out, err = sy("tokens", "revoke", prefix, "--tenant", tenant)
        assert code == 2, err
        assert one_sentence(err) == (f"{shown} is not a token prefix (12 hex digits, as `switchyard tokens list` shows "
                                     f"them) or a whole token")


def test_a_tenant_name_with_a_final_newline_is_refused(sy: Sy) -> None:
    code, _out, err = sy("tokens", "create", "--tenant", "a\n")
    assert code == 2, err
    assert one_sentence(err) == "tenant name 'a\\n' must be 1-100 letters, digits, '.', '_' or '-'"
