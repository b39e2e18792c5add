"""The three ways rows reach ``jobs`` (pipeline.intake.write) store the same jobs, and the one
COPY for a new batch gives way correctly: to staged chunks when the file repeats a key, to a
rollback when a line is bad."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import migrate
from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory
from pipeline.errors import JobInputError
from pipeline.intake.enqueue import Tick, enqueue_file
from pipeline.models import Batch, Job

JOBS: list[dict[str, Any]] = [
    {"key": "c", "kind": "classify", "text": "tab\there, back\\slash, new\nline", "labels": ["a", "b"]},
    {"key": "e", "kind": "extract", "text": "Dana", "schema": {"type": "object", "maximum": 2.50}},
    {"key": "d", "kind": "draft", "instructions": "café 漢字 😀", "context": None, "tier": "opus"},
    {"key": "g", "kind": "generate", "prompt": "x", "metadata": {"big": 10**25, "f": 1.5, "nested": {"a": [1, None]}}},
    {"kind": "generate", "prompt": "no key: keyed by content"},
]


def _write(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(j, ensure_ascii=False) + "\n" for j in jobs))
    return path


def _stored(sessions: sessionmaker[Session], batch: str) -> dict[str, tuple[Any, ...]]:
    with sessions() as s:
        rows = s.execute(select(Job.key, Job.kind, Job.payload, Job.meta, Job.pinned_tier, Job.status)
                         .join(Batch).where(Batch.name == batch))
        return {r.key: (r.kind, json.dumps(r.payload, sort_keys=True), json.dumps(r.meta, sort_keys=True),
                        r.pinned_tier, r.status) for r in rows}


def _count(sessions: sessionmaker[Session], batch: str) -> tuple[int, int]:
    with sessions() as s:
        batches = s.scalar(select(func.count()).select_from(Batch).where(Batch.name == batch)) or 0
        jobs = s.scalar(select(func.count()).select_from(Job).join(Batch).where(Batch.name == batch)) or 0
    return batches, jobs


def test_every_writer_stores_the_same_jobs(sessions: sessionmaker[Session], models: ModelConfig,
                                           tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs.jsonl", JOBS)
    # A new batch, one transaction: the COPY into jobs. --skip-invalid: staged chunks.
    assert enqueue_file(sessions, path, batch="w-copy", config=models).accepted == 5
    assert enqueue_file(sessions, path, batch="w-stage", config=models, skip_invalid=True).accepted == 5
    copied, staged = _stored(sessions, "w-copy"), _stored(sessions, "w-stage")
    assert copied == staged
    assert json.loads(copied["g"][2]) == {"big": 10**25, "f": 1.5, "nested": {"a": [1, None]}}  # exact, as an object
    assert json.loads(copied["c"][1])["text"] == "tab\there, back\\slash, new\nline"
    assert json.loads(copied["d"][1]) == {"instructions": "café 漢字 😀"}  # a null optional field is left out

    # SQLite (the demo): plain inserts.
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        lite = session_factory(engine)
        assert enqueue_file(lite, path, batch="w-copy", config=models).accepted == 5
        assert _stored(lite, "w-copy") == copied
    finally:
        engine.dispose()


def test_a_new_batch_whose_file_repeats_a_key_is_written_again(sessions: sessionmaker[Session],
                                                               models: ModelConfig, tmp_path: Path) -> None:
    jobs = [{"key": f"k{i % 30}", "kind": "generate", "prompt": f"p{i % 30}"} for i in range(100)]
    path = _write(tmp_path / "repeats.jsonl", jobs)
    phases: list[str] = []

    def progress(t: Tick) -> None:
        phases.append(t.phase)

    report = enqueue_file(sessions, path, batch="w-repeats", config=models, chunk_size=20, progress=progress)
    assert (report.read, report.accepted, report.duplicates) == (100, 30, 70)
    assert "rewriting" in phases and phases[-1] == "rewriting"
    assert _count(sessions, "w-repeats") == (1, 30)

    jobs[77] = {"key": "k17", "kind": "generate", "prompt": "something else"}
    with pytest.raises(JobInputError, match="line 78: key 'k17' was already used in this batch for a different job"):
        enqueue_file(sessions, _write(tmp_path / "clash.jsonl", jobs), batch="w-clash", config=models, chunk_size=20)
    assert _count(sessions, "w-clash") == (0, 0)


def test_a_bad_line_after_the_first_chunk_cancels_the_copy(sessions: sessionmaker[Session], models: ModelConfig,
                                                          tmp_path: Path) -> None:
    lines = [json.dumps({"key": f"k{i}", "kind": "generate", "prompt": "x"}) for i in range(100)]
    lines[34] = lines[90] = '{"kind": "generate"}'
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JobInputError) as info:
        enqueue_file(sessions, path, batch="w-late", config=models, chunk_size=10)
    assert str(info.value) == f"{path}, line 35: missing required field 'prompt' (2 bad lines in all)"
    assert _count(sessions, "w-late") == (0, 0)
    # The pooled connection the cancelled COPY ran on is fit for the next enqueue.
    lines[34] = lines[90] = json.dumps({"key": "fixed", "kind": "generate", "prompt": "x"})
    path.write_text("\n".join(lines) + "\n")
    report = enqueue_file(sessions, path, batch="w-late", config=models, chunk_size=10)
    assert (report.accepted, report.duplicates) == (99, 1)


def test_a_clash_under_skip_invalid_is_reported_with_its_line(sessions: sessionmaker[Session], models: ModelConfig,
                                                              tmp_path: Path) -> None:
    first = _write(tmp_path / "first.jsonl", [{"key": "k1", "kind": "generate", "prompt": "first"}])
    assert enqueue_file(sessions, first, batch="w-skip", config=models).accepted == 1
    later = [{"key": "k2", "kind": "generate", "prompt": "new"}, {"key": "k1", "kind": "generate", "prompt": "second"},
             {"key": "k1", "kind": "generate", "prompt": "first"}, {"key": "k3", "kind": "generate", "prompt": "3"}]
    # A chunk a line: each is committed, and the pool may hand out another connection after each.
    report = enqueue_file(sessions, _write(tmp_path / "later.jsonl", later), batch="w-skip", config=models,
                          skip_invalid=True, chunk_size=1)
    assert (report.accepted, report.duplicates, report.invalid_count) == (2, 1, 1)
    assert report.invalid[0].line == 2
    assert "different job" in report.invalid[0].reason
    assert json.loads(report.invalid[0].raw)["prompt"] == "second"
    assert _count(sessions, "w-skip") == (1, 3)
    # Every connection went back to the pool with nothing left open on it.
    for _ in range(3):
        assert enqueue_file(sessions, first, batch="w-skip", config=models).duplicates == 1
