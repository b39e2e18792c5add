"""Every command of the README's "Bulk enqueue and query history" section, run as written (in
order, by a shell) against the test database."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.cluster import SWITCHYARD
from tests.history.helpers import cli_env

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Bulk enqueue and query history"


def readme_commands(heading: str = SECTION) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    nxt = section.find("\n## ", len(heading))
    section = section if nxt < 0 else section[:nxt]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_history_commands_work_as_written(history_url: str, tmp_path: Path) -> None:
    commands = readme_commands()
    assert len(commands) >= 12
    (tmp_path / "pipeline" / "samples").mkdir(parents=True)
    shutil.copy(ROOT / "pipeline" / "samples" / "demo.jsonl", tmp_path / "pipeline" / "samples" / "demo.jsonl")
    env = cli_env(history_url)
    env["PATH"] = f"{Path(SWITCHYARD).parent}{os.pathsep}{env.get('PATH', '')}"
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    assert len((tmp_path / "tickets-results.csv").read_text().splitlines()) == 52  # header + 51 jobs
    assert len((tmp_path / "tickets-results.jsonl").read_text().splitlines()) == 51
