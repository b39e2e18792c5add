"""`make demo`'s command on the embedded default: SQLite, the in-process broker, the fake Claude;
and `make demo-cascade`'s, the same under the sample cascade policy."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

from tests.cluster import SWITCHYARD

CASCADE = Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "cascade.toml"


def demo_env(tmp_path: Path, **env_extra: str) -> dict[str, str]:
    """The environment of a fresh machine's `make demo`: none of switchyard's or the API's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "SWITCHYARD_")) and k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/demo.sqlite", COLUMNS="200", **env_extra)
    return env


def run_demo(tmp_path: Path, *args: str, **env_extra: str) -> str:
    out = subprocess.run([SWITCHYARD, "demo", *args], env=demo_env(tmp_path, **env_extra), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "answers are simulated by the bundled fake Claude" in text
    assert "Broker: memory://" in text
    assert re.search(r"jobs: 51 \(succeeded 51\)", text), text
    # The second batch: the README's example task, applied, and its tickets worked under it.
    assert re.search(r"batch demo-[\d-]+-tasks", text), text
    assert re.search(r"jobs: 12 \(succeeded 12\)", text), text
    # Each batch's summary ends with the saving and the estimated agreement, from its shadowed jobs.
    assert "shadow rate 0.5 (reference tier opus)" in text, text
    lines = quality_lines(text)
    assert len(lines) == 2, text
    for saved, estimate, low, high, shadowed, cost in lines:
        assert 0 < saved < 100 and shadowed > 0 and cost > 0, text
        assert 0 <= low <= estimate <= high <= 1, text
    return text


QUALITY = re.compile(r"saved (\d+)% against all-opus; estimated agreement with opus (\d\.\d\d) "
                     r"\[(\d\.\d\d), (\d\.\d\d)\] from (\d+) shadowed jobs(?:, covering \d+% of the jobs)? "
                     r"\(evaluation cost \$([\d.]+)\)")


def quality_lines(text: str) -> list[tuple[int, float, float, float, int, float]]:
    return [(int(m[1]), float(m[2]), float(m[3]), float(m[4]), int(m[5]), float(m[6]))
            for m in QUALITY.finditer(text)]


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


def test_demo_in_economy_mode_makes_every_call_through_message_batches(tmp_path: Path) -> None:
    """`switchyard demo --mode economy` on the embedded default (SQLite, the in-process broker): the
    demo's dispatcher runs the economy round, and every call of both batches, shadows included,
    goes through the fake's message batches at the batch price."""
    text = run_demo(tmp_path, "--mode", "economy")
    assert "Economy mode: every call through the fake's message batches" in text, text
    lines = re.findall(r"economy mode: ([\d,]+) call\(s\) through message batches cost", text)
    assert len(lines) == 2 and all(int(n.replace(",", "")) > 0 for n in lines), text
    with sqlite3.connect(tmp_path / "demo.sqlite") as db:
        stages = dict(db.execute("SELECT stage, count(*) FROM model_calls GROUP BY stage").fetchall())
        synchronous = db.execute("SELECT count(*) FROM model_calls WHERE message_batch_id IS NULL").fetchone()[0]
        batches = db.execute("SELECT count(*), min(state), max(state) FROM message_batches").fetchone()
    assert {"triage", "work", "shadow"} <= set(stages), stages
    assert synchronous == 0, f"{synchronous} call(s) made synchronously: {stages}"
    assert batches[0] > 0 and batches[1] == batches[2] == "ended", batches


def test_demo_refuses_a_mode_it_does_not_know(tmp_path: Path) -> None:
    out = subprocess.run([SWITCHYARD, "demo", "--mode", "cheap"], env=demo_env(tmp_path), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--mode must be standard or economy, not 'cheap'" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_demo_refuses_a_shadow_rate_outside_0_to_1(tmp_path: Path) -> None:
    out = subprocess.run([SWITCHYARD, "demo", "--shadow-rate", "2"], env=demo_env(tmp_path), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--shadow-rate must be a number from 0 to 1" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_a_stage_that_raises_stops_the_demo_with_its_traceback(tmp_path: Path) -> None:
    """A stage raises only on a bug. The demo stops at the first one and shows its traceback,
    rather than sitting out its timeout saying nothing. The bug is planted in a real run: the work
    stage's function, replaced before the CLI starts, in a process of its own."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"kind": "generate", "prompt": "Say hello.", "tier": "sonnet"}\n')
    planted = ("import sys, workers.work\n"
               "def broken(p, job_id):\n"
               "    raise ZeroDivisionError('a planted bug in the work stage')\n"
               "workers.work.Work.stage = staticmethod(broken)\n"
               "from pipeline.cli.app import main\n"
               "sys.argv = ['switchyard', 'demo', '--jobs', sys.argv[1]]\n"
               "main()\n")
    out = subprocess.run([str(Path(SWITCHYARD).parent / "python"), "-c", planted, str(jobs)],
                         env=demo_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "a stage raised in the demo's worker (switchyard.work), which is a bug in switchyard" in text, text
    assert "ZeroDivisionError: a planted bug in the work stage" in text, text
    assert "did not finish within" not in text, text
