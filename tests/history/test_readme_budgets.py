"""The commands of the README's "Budgets" section, run as written (in order, by a shell) against
the test database: a batch enqueued with a budget, its budget raised, the batches listed with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Batch
from tests.cluster import SWITCHYARD
from tests.history.helpers import cli_env
from tests.history.test_readme import ROOT, readme_commands


def test_readme_budget_commands_work_as_written(history_url: str, history_sessions: sessionmaker[Session],
                                                tmp_path: Path) -> None:
    commands = readme_commands("## Budgets")
    assert any("--budget-usd" in c for c in commands) and any("batches budget" in c for c in commands)
    (tmp_path / "pipeline" / "samples").mkdir(parents=True)
    shutil.copy(ROOT / "pipeline" / "samples" / "demo.jsonl", tmp_path / "pipeline" / "samples" / "demo.jsonl")
    env = cli_env(history_url)
    env["PATH"] = f"{Path(SWITCHYARD).parent}{os.pathsep}{env.get('PATH', '')}"
    last = ""
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        last = proc.stdout
    with history_sessions() as s:
        budget = s.scalar(select(Batch.budget_usd).where(Batch.name == "capped", Batch.tenant_id.is_(None)))
    assert budget == Decimal("2")
    [shown] = [b for b in json.loads(last) if b["name"] == "capped"]
    assert shown["budget"]["budget_usd"] == "2.00000000" and shown["budget"]["exhausted"] is False
