"""`make demo`'s command on the embedded default: SQLite, the in-process broker, the fake Claude;
and `make demo-cascade`'s, the same under the sample cascade policy."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.cluster import SWITCHYARD

CASCADE = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "cascade.toml"


def run_demo(tmp_path: Path, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "SWITCHYARD_")) and k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/demo.sqlite", COLUMNS="200", **env_extra)
    out = subprocess.run([SWITCHYARD, "demo"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "answers are simulated by the bundled fake Claude" in text
    assert "Broker: memory://" in text
    assert re.search(r"jobs: 51 \(succeeded 51\)", text), text
    # The second batch: the README's example task, applied, and its tickets worked under it.
    assert re.search(r"batch demo-[\d-]+-tasks", text), text
    assert re.search(r"jobs: 12 \(succeeded 12\)", text), text
    return text


def ended_at(text: str) -> dict[str, int]:
    """The first batch's "jobs ended here" per tier, from its routing summary."""
    first = text.split("-tasks ")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"│ (haiku|sonnet|opus)\s+│\s+(\d+) │", first)}


def escalations(text: str) -> int:
    found = re.search(r"escalations: (\d+)", text)
    assert found is not None, text
    return int(found.group(1))


def test_demo_runs_the_whole_pipeline_on_the_embedded_default(tmp_path: Path) -> None:
    text = run_demo(tmp_path)
    assert "Routing (defaults.toml): easy -> sonnet, medium -> sonnet, hard -> opus, ambiguous -> opus; " \
           "escalation sonnet -> opus; work queues sonnet, opus." in text, text
    routed = ended_at(text)
    assert routed.get("sonnet", 0) > 0 and routed.get("opus", 0) > 0, text
    assert routed.get("haiku", 0) == 0, text  # Haiku only triages and checks formats here
    assert escalations(text) >= 1, text


def test_demo_under_the_cascade_gives_haiku_work(tmp_path: Path) -> None:
    text = run_demo(tmp_path, SWITCHYARD_CONFIG=str(CASCADE))
    assert "escalation haiku -> sonnet -> opus; work queues haiku, sonnet, opus." in text, text
    routed = ended_at(text)
    assert routed.get("haiku", 0) > 0 and routed.get("sonnet", 0) > 0 and routed.get("opus", 0) > 0, text
    # The sample job Haiku and then Sonnet get wrong climbs the whole chain: two escalations.
    assert escalations(text) >= 2, text
