"""`switchyard enqueue` as a subprocess on the real Postgres: flat memory, idempotency, bad lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Batch, Job
from tests.history.helpers import job_line, peak_rss_kb, switchyard, switchyard_json, write_jsonl


def _count(history_sessions: sessionmaker[Session], batch: str) -> int:
    with history_sessions() as s:
        return s.scalar(select(func.count()).select_from(Job).join(Batch).where(Batch.name == batch)) or 0


def test_memory_stays_flat_from_10k_to_100k_jobs(history_url: str, history_sessions: sessionmaker[Session],
                                                 tmp_path: Path) -> None:
    small = write_jsonl(tmp_path / "small.jsonl", (job_line(i) for i in range(10_000)))
    big = write_jsonl(tmp_path / "big.jsonl", (job_line(i) for i in range(100_000)))

    small_kb = peak_rss_kb(history_url, "enqueue", str(small), "--batch", "mem-10k", "--json")
    big_kb = peak_rss_kb(history_url, "enqueue", str(big), "--batch", "mem-100k", "--json")

    assert _count(history_sessions, "mem-10k") == 10_000
    assert _count(history_sessions, "mem-100k") == 100_000
    # Ten times the lines, nowhere near ten times the memory: the file is streamed in chunks.
    assert big_kb < 1.5 * small_kb, (small_kb, big_kb)


def test_same_file_twice_adds_nothing_and_reports_duplicates(history_url: str, history_sessions: sessionmaker[Session],
                                                             tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "twice.jsonl", (job_line(i) for i in range(2_500)))
    first = switchyard_json(history_url, "enqueue", str(path), "--batch", "twice")
    second = switchyard_json(history_url, "enqueue", str(path), "--batch", "twice")

    assert (first["read"], first["accepted"], first["duplicates"]) == (2_500, 2_500, 0)
    assert (second["read"], second["accepted"], second["duplicates"]) == (2_500, 0, 2_500)
    assert _count(history_sessions, "twice") == 2_500
    # Keyless jobs are keyed by their content: the same content twice is one job.
    keyless = write_jsonl(tmp_path / "keyless.jsonl", [{"kind": "generate", "prompt": "same"}] * 3)
    assert switchyard_json(history_url, "enqueue", str(keyless), "--batch", "keyless")["accepted"] == 1


def test_bad_line_rejects_whole_file_naming_the_line(history_url: str, history_sessions: sessionmaker[Session],
                                                     tmp_path: Path) -> None:
    lines = [json.dumps(job_line(i)) for i in range(5_000)]
    lines[4_321] = '{"key": "broken", "kind": "classify", "text": "no labels"}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    proc = switchyard(history_url, "enqueue", str(path), "--batch", "bad-default", ok=False)

    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert f"{path}, line 4322: a classify job needs 'labels'" in message
    assert "Nothing was written" in message
    assert "Traceback" not in proc.stderr
    assert _count(history_sessions, "bad-default") == 0


def test_skip_invalid_keeps_good_lines_and_reports_bad_ones(history_url: str, history_sessions: sessionmaker[Session],
                                                             tmp_path: Path) -> None:
    lines = [json.dumps(job_line(i)) for i in range(1_000)]
    lines[10] = "not json at all"
    lines[500] = '{"key": "k500", "kind": "sing", "text": "x"}'
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = tmp_path / "bad-lines.jsonl"

    out = switchyard_json(history_url, "enqueue", str(path), "--batch", "bad-skip", "--skip-invalid",
                          "--invalid-report", str(report))

    assert (out["read"], out["accepted"], out["invalid"]) == (1_000, 998, 2)
    assert out["invalid_report"] == str(report)
    assert _count(history_sessions, "bad-skip") == 998
    bad = [json.loads(x) for x in report.read_text().splitlines()]
    assert [b["line"] for b in bad] == [11, 501]
    assert bad[0]["input"] == "not json at all"
    assert "not valid JSON" in bad[0]["error"]
    assert "unknown kind 'sing'" in bad[1]["error"]


def test_csv_columns_map_to_job_fields(history_url: str, history_sessions: sessionmaker[Session],
                                       tmp_path: Path) -> None:
    path = tmp_path / "jobs.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "kind", "text", "labels", "prompt", "tier", "metadata"])
        w.writerow(["c1", "classify", "charged twice", "billing|bug", "", "", '{"team": "a"}'])
        w.writerow(["c2", "generate", "", "", 'say "hi",\nthen stop', "opus", ""])
        w.writerow(["c3", "classify", "hello", '["x", "y"]', "", "", ""])
        w.writerow(["c4", "classify", "no labels", "", "", "", ""])
    out = switchyard_json(history_url, "enqueue", str(path), "--skip-invalid")

    assert out["batch"] == "jobs"
    assert (out["accepted"], out["invalid"]) == (3, 1)
    with history_sessions() as s:
        jobs = {j.key: j for j in s.scalars(select(Job).join(Batch).where(Batch.name == "jobs"))}
    assert jobs["c1"].payload == {"text": "charged twice", "labels": ["billing", "bug"]}
    assert jobs["c1"].meta == {"team": "a"}
    assert jobs["c2"].payload == {"prompt": 'say "hi",\nthen stop'}
    assert jobs["c2"].pinned_tier == "opus"
    assert jobs["c3"].payload["labels"] == ["x", "y"]
    bad = [json.loads(x) for x in path.with_name("jobs.csv.invalid.jsonl").read_text().splitlines()]
    assert bad[0]["line"] == 6  # c2's quoted cell spans lines 3-4

    path.write_text("key,kind,txt\nk,classify,x\n")
    proc = switchyard(history_url, "enqueue", str(path), "--batch", "csv-bad-header", ok=False)
    assert proc.returncode == 2
    assert "'txt' are not job fields" in proc.stderr
