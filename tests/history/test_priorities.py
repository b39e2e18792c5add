"""Priorities and tenant weights from the command line (this folder's `sy` fixture, on a database of
this module's own): what is set is what `batches` and `tenants list` show, a task sets the default
priority of the batches its jobs start, and a value out of range is one sentence, exit 2, and
changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Sy = Callable[..., tuple[int, str, str]]


def one_sentence(err: str) -> str:
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    return " ".join(err.removeprefix("error: ").split())


def jobs_file(tmp_path: Path, name: str, n: int = 3, **fields: Any) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"key": f"k{i}", "kind": "generate", "prompt": f"p{i}", **fields}) + "\n"
                            for i in range(n)))
    return path


def batch_row(sy_json: Callable[..., Any], name: str) -> dict[str, Any] | None:
    return next((b for b in sy_json("batches") if b["name"] == name), None)


def test_a_batch_takes_the_priority_given_and_batches_shows_it(sy: Sy, sy_json: Callable[..., Any],
                                                               tmp_path: Path) -> None:
    code, _out, err = sy("enqueue", str(jobs_file(tmp_path, "urgent")), "--priority", "8")
    assert code == 0, err
    default = sy_json("enqueue", str(jobs_file(tmp_path, "bulk")))
    assert batch_row(sy_json, "urgent")["priority"] == 8  # type: ignore[index]
    assert batch_row(sy_json, "bulk")["priority"] == 5  # type: ignore[index]
    assert default["accepted"] == 3
    code, out, err = sy("batches")
    assert code == 0, err
    assert "priority" in out and "in flight now: none" in out


@pytest.mark.parametrize("value", ["10", "-1"])
def test_a_priority_out_of_range_is_one_sentence_and_changes_nothing(sy: Sy, sy_json: Callable[..., Any],
                                                                     tmp_path: Path, value: str) -> None:
    name = f"kept{value.replace('-', 'm')}"
    path = jobs_file(tmp_path, name)
    assert sy("enqueue", str(path), "--priority", "7")[0] == 0
    more = jobs_file(tmp_path, name, n=5)  # two more jobs, which must not be written
    code, out, err = sy("enqueue", str(more), "--priority", value)
    assert code == 2 and out == ""
    assert one_sentence(err) == (f"--priority must be a whole number from 0 to 9 (9 is admitted first, 5 by "
                                 f"default), not {value}")
    row = batch_row(sy_json, name)
    assert row is not None and row["priority"] == 7 and row["jobs"] == 3
    # ...and for a new batch, no batch at all.
    code, _out, err = sy("enqueue", str(jobs_file(tmp_path, f"new{name}")), "--priority", value)
    assert code == 2 and batch_row(sy_json, f"new{name}") is None


def test_a_task_sets_the_priority_of_the_batches_its_jobs_start(sy: Sy, sy_json: Callable[..., Any],
                                                                tmp_path: Path) -> None:
    task = tmp_path / "backfill.toml"
    task.write_text('name = "backfill"\nkind = "generate"\ninstructions = "Write it."\npriority = 2\n')
    assert sy("tasks", "apply", str(task))[0] == 0
    assert sy("enqueue", str(jobs_file(tmp_path, "nightly", task="backfill")))[0] == 0
    assert batch_row(sy_json, "nightly")["priority"] == 2  # type: ignore[index]
    # The batch's own priority is over the task's.
    assert sy("enqueue", str(jobs_file(tmp_path, "rush", task="backfill")), "--priority", "9")[0] == 0
    assert batch_row(sy_json, "rush")["priority"] == 9  # type: ignore[index]
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad-priority"\nkind = "generate"\ninstructions = "Write it."\npriority = 12\n')
    code, _out, err = sy("tasks", "apply", str(bad))
    assert code == 2 and "field 'priority' must be a whole number from 0 to 9" in one_sentence(err)
    assert sy("tasks", "show", "bad-priority")[0] == 2


def test_a_tenants_weight_is_set_shown_and_checked(sy: Sy, sy_json: Callable[..., Any]) -> None:
    assert sy("tokens", "create", "--tenant", "weighted", "--json")[0] == 0
    assert sy_json("tenants", "limits", "weighted", "--weight", "3")["weight"] == 3
    for bad in ("0", "-2", "nan", "1001"):
        code, _out, err = sy("tenants", "limits", "weighted", "--weight", bad)
        assert code == 2 and one_sentence(err).startswith("--weight must be a number above 0 and at most 1000"), err
    [row] = [t for t in sy_json("tenants", "list") if t["tenant"] == "weighted"]
    assert row["weight"] == 3
    # --clear removes the limits, not the weight.
    assert sy_json("tenants", "limits", "weighted", "--clear")["weight"] == 3
