"""Edge inputs to `enqueue_file` on the real Postgres: an empty file, a byte-order mark, a CSV file
whose header or quoting is broken. Each is refused with one sentence naming where (or accepted, for
the byte-order mark), and nothing already in a batch is lost."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.errors import InputFileError, JobInputError
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Batch, Job

GOOD = {"key": "a", "kind": "generate", "prompt": "hello"}
BOM = b"\xef\xbb\xbf"


def _name() -> str:
    return f"edge-{uuid.uuid4().hex[:8]}"


def _count(sessions: sessionmaker[Session], batch: str) -> tuple[int, int]:
    with sessions() as s:
        batches = s.scalar(select(func.count()).select_from(Batch).where(Batch.name == batch)) or 0
        jobs = s.scalar(select(func.count()).select_from(Job).join(Batch).where(Batch.name == batch)) or 0
    return batches, jobs


@pytest.mark.parametrize("content", [b"", b"\n\n   \n", BOM, b"kind,prompt\n"], ids=["empty", "blank", "bom", "header"])
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_file_without_jobs_is_refused_and_makes_no_batch(sessions: sessionmaker[Session], models: ModelConfig,
                                                           tmp_path: Path, content: bytes, skip_invalid: bool) -> None:
    path = tmp_path / ("jobs.csv" if content.startswith(b"kind") else "jobs.jsonl")
    path.write_bytes(content)
    name = _name()
    with pytest.raises(InputFileError) as info:
        enqueue_file(sessions, path, batch=name, config=models, skip_invalid=skip_invalid)
    assert str(info.value) == f"{path} has no jobs: nothing was enqueued"
    assert _count(sessions, name) == (0, 0)


def test_an_empty_file_into_an_existing_batch_changes_nothing(sessions: sessionmaker[Session], models: ModelConfig,
                                                             tmp_path: Path) -> None:
    name = _name()
    (tmp_path / "one.jsonl").write_text(json.dumps(GOOD) + "\n")
    enqueue_file(sessions, tmp_path / "one.jsonl", batch=name, config=models)
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(InputFileError, match="has no jobs"):
        enqueue_file(sessions, tmp_path / "none.jsonl", batch=name, config=models)
    assert _count(sessions, name) == (1, 1)


def test_only_bad_lines_with_skip_invalid_makes_no_batch(sessions: sessionmaker[Session], models: ModelConfig,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n{}\n")
    name = _name()
    report = enqueue_file(sessions, path, batch=name, config=models, skip_invalid=True)
    assert (report.read, report.accepted, report.invalid_count, report.batch_id) == (2, 0, 2, None)
    assert _count(sessions, name) == (0, 0)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_byte_order_mark_is_accepted(sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
                                       fmt: str) -> None:
    path = tmp_path / f"bom.{fmt}"
    if fmt == "jsonl":
        path.write_bytes(BOM + json.dumps(GOOD).encode() + b"\n" + json.dumps({**GOOD, "key": "b"}).encode() + b"\n")
    else:
        path.write_bytes(BOM + b"key,kind,prompt\r\na,generate,hello\r\nb,generate,hello\r\n")
    name = _name()
    assert enqueue_file(sessions, path, batch=name, config=models).accepted == 2
    with sessions() as s:
        keys = s.scalars(select(Job.key).join(Batch).where(Batch.name == name).order_by(Job.key)).all()
    assert keys == ["a", "b"]


def test_a_column_named_twice_refuses_the_file(sessions: sessionmaker[Session], models: ModelConfig,
                                               tmp_path: Path) -> None:
    """Which of the two cells would be the job's? Neither is guessed."""
    path = tmp_path / "twice.csv"
    path.write_text("kind,prompt,prompt\ngenerate,a,b\n")
    name = _name()
    for skip_invalid in (False, True):
        with pytest.raises(InputFileError) as info:
            enqueue_file(sessions, path, batch=name, config=models, skip_invalid=skip_invalid)
        assert str(info.value) == f"{path}, line 1: column 'prompt' appears twice in the header (columns 2 and 3)"
        assert _count(sessions, name) == (0, 0)


@pytest.mark.parametrize(("content", "line"), [
    ('kind,prompt\ngenerate,fine\ngenerate,"never closed\nmore\n', 3),
    ('kind,prompt,key\ngenerate,"never closed,k1\n', 2),
])
def test_a_quote_never_closed_is_named_with_its_line_and_column(sessions: sessionmaker[Session], models: ModelConfig,
                                                               tmp_path: Path, content: str, line: int) -> None:
    """It swallows the rest of the file into one cell, which the csv module would take as it is."""
    path = tmp_path / "open.csv"
    path.write_text(content)
    name = _name()
    with pytest.raises(JobInputError) as info:
        enqueue_file(sessions, path, batch=name, config=models)
    assert str(info.value) == (f"{path}, line {line}: column 'prompt': a quoted cell is not closed before the end "
                               f"of the file")
    assert _count(sessions, name) == (0, 0)
    # With --skip-invalid it is that one bad line, and the lines before it are kept.
    report = enqueue_file(sessions, path, batch=name, config=models, skip_invalid=True)
    assert [b.line for b in report.invalid] == [line]
    assert report.accepted == line - 2


def test_a_malformed_csv_record_is_a_bad_line(sessions: sessionmaker[Session], models: ModelConfig,
                                              tmp_path: Path) -> None:
    """Text after a closing quote, or bytes that are not UTF-8, spoil one record, not the file:
    the record is a bad line like any other (refusing the file, or reported with --skip-invalid)."""
    path = tmp_path / "spoilt.csv"
    path.write_bytes(b'key,kind,prompt\n'
                     b'a,generate,hello\n'
                     b'b,generate,"quoted"then more\n'
                     b'c,generate,caf\xe9\n'
                     b'd,generate,"multi\nline"\n')
    name = _name()
    with pytest.raises(JobInputError) as info:
        enqueue_file(sessions, path, batch=name, config=models)
    assert str(info.value) == (f"{path}, line 3: column 'prompt': text after the closing quote of a quoted cell "
                               f"(2 bad lines in all)")
    assert _count(sessions, name) == (0, 0)

    report = enqueue_file(sessions, path, batch=name, config=models, skip_invalid=True)
    assert (report.accepted, report.invalid_count) == (2, 2)
    assert [(b.line, b.reason) for b in report.invalid] == [
        (3, "column 'prompt': text after the closing quote of a quoted cell"),
        (4, "not valid UTF-8 (column 'prompt')"),
    ]
    with sessions() as s:
        keys = s.scalars(select(Job.key).join(Batch).where(Batch.name == name).order_by(Job.key)).all()
    assert keys == ["a", "d"]


def test_a_bad_batch_name_writes_nothing(sessions: sessionmaker[Session], models: ModelConfig,
                                         tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    for name in ("x" * 201, "a\u202eb", " ", "a\udcffb"):
        with pytest.raises(JobInputError, match=r"^batch name "):
            enqueue_file(sessions, path, batch=name, config=models)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Batch).where(Batch.name.in_(["x" * 200, " "]))) == 0
