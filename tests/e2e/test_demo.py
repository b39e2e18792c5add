"""`make demo`'s command on the embedded default: SQLite, the in-process broker, the fake Claude."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.cluster import SWITCHYARD


def test_demo_runs_the_whole_pipeline_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "SWITCHYARD_")) and k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/demo.sqlite", COLUMNS="200")
    out = subprocess.run([SWITCHYARD, "demo"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "answers are simulated by the bundled fake Claude" in text
    assert "Broker: memory://" in text
    routed = {m.group(1): int(m.group(2)) for m in re.finditer(r"│ (sonnet|opus)\s+│\s+(\d+) │", text)}
    assert routed.get("sonnet", 0) > 0 and routed.get("opus", 0) > 0, text
    escalations = re.search(r"escalations: (\d+)", text)
    assert escalations is not None and int(escalations.group(1)) >= 1, text
    assert re.search(r"jobs: 51 \(succeeded 51\)", text), text
    # The second batch: the README's example task, applied, and its tickets worked under it.
    assert re.search(r"batch demo-[\d-]+-tasks", text), text
    assert re.search(r"jobs: 12 \(succeeded 12\)", text), text
