"""Bad input fails clearly, naming the line and the problem, and loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.errors import JobInputError
from pipeline.intake.enqueue import enqueue_file
from pipeline.intake.jobspec import MAX_KEY_LENGTH, parse_job, parse_line
from pipeline.models import Batch, Job
from pipeline.names import MAX_BATCH_NAME_LENGTH, check_batch_name
from tests.history.helpers import BAD_BATCH_NAMES

TIERS = ("sonnet", "opus")
GOOD = {"key": "a", "kind": "classify", "text": "hello", "labels": ["x", "y"]}


BAD_JOBS = [
    ({"kind": "summarise", "text": "x"}, "unknown kind 'summarise'"),
    ({"text": "x"}, "missing required field 'kind'"),
    ({"kind": "classify", "text": "x"}, "a classify job needs 'labels'"),
    ({"kind": "classify", "text": "x", "labels": []}, "non-empty list"),
    ({"kind": "classify", "text": "x", "labels": ["a", "a"]}, "the same label twice"),
    ({"kind": "classify", "text": 5, "labels": ["a"]}, "'text' must be a string, not int"),
    ({"kind": "classify", "text": "  ", "labels": ["a"]}, "'text' must not be empty"),
    ({"kind": "extract", "text": "x"}, "an extract job needs 'schema'"),
    ({"kind": "extract", "text": "x", "schema": {"type": "objekt"}}, "not a valid JSON Schema"),
    ({"kind": "extract", "text": "x", "schema": {"type": "object", "required": "name"}}, "not a valid JSON Schema"),
    ({"kind": "extract", "text": "x", "schema": []}, "must be a JSON object"),
    ({"kind": "draft"}, "missing required field 'instructions'"),
    ({"kind": "generate", "prompt": "x", "tier": "haiku"}, "unknown tier 'haiku'"),
    ({"kind": "generate", "prompt": "x", "temperature": 1}, "unknown field(s) 'temperature'"),
    ({"kind": "generate", "prompt": "x", "metadata": [1]}, "'metadata' must be a JSON object"),
    ({"kind": "generate", "prompt": "x", "key": ""}, "'key' must be a non-empty string"),
    ({"kind": "generate", "prompt": "a\x00b"}, "NUL"),
    ([1, 2], "must be a JSON object, not list"),
]


@pytest.mark.parametrize(("obj", "message"), BAD_JOBS)
def test_each_bad_job_gets_one_clear_reason(obj: object, message: str) -> None:
    with pytest.raises(JobInputError) as info:
        parse_job(obj, work_tiers=TIERS)
    assert message in str(info.value)


@pytest.mark.parametrize(("obj", "message"), BAD_JOBS)
def test_each_bad_line_gets_the_same_reason(obj: object, message: str) -> None:
    """A file's line is read by orjson and a plain job takes a shorter path: a bad one still gets
    the general path's message."""
    with pytest.raises(JobInputError) as info:
        parse_line(json.dumps(obj).encode(), work_tiers=TIERS)
    assert message in str(info.value)


def test_malformed_lines() -> None:
    with pytest.raises(JobInputError, match="not valid JSON"):
        parse_line('{"kind": "generate", "prompt": ', work_tiers=TIERS)
    with pytest.raises(JobInputError, match="not valid UTF-8"):
        parse_line(b'{"kind": "generate", "prompt": "\xff"}', work_tiers=TIERS)
    with pytest.raises(JobInputError, match="nested too deeply"):
        parse_line("[" * 100_000 + "]" * 100_000, work_tiers=TIERS)


def test_a_job_too_large_for_the_context_is_rejected_with_its_size() -> None:
    with pytest.raises(JobInputError, match=r"too large for the model's context: about [\d,]+ tokens, limit 1,000"):
        parse_job({"kind": "generate", "prompt": "x" * 10_000}, work_tiers=TIERS, max_tokens=1000)


def test_default_key_is_the_content() -> None:
    a = parse_job({"kind": "generate", "prompt": "same"}, work_tiers=TIERS)
    b = parse_job({"kind": "generate", "prompt": "same"}, work_tiers=TIERS)
    c = parse_job({"kind": "generate", "prompt": "other"}, work_tiers=TIERS)
    assert a.key == b.key != c.key and a.key.startswith("sha256:")


def _count(sessions: sessionmaker[Session], batch: str) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Job).join(Batch).where(Batch.name == batch)) or 0


def test_a_bad_line_rejects_the_file_and_writes_nothing(sessions: sessionmaker[Session], models: ModelConfig,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    lines = [json.dumps(GOOD), json.dumps({**GOOD, "key": "b"}), '{"kind": "classify", "text": "no labels"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JobInputError) as info:
        enqueue_file(sessions, path, batch="bad-line", config=models)
    assert str(info.value) == f"{path}, line 3: a classify job needs 'labels', a list of the allowed labels"
    assert _count(sessions, "bad-line") == 0

    report = enqueue_file(sessions, path, batch="bad-line", config=models, skip_invalid=True)
    assert (report.accepted, report.invalid_count, report.invalid[0].line) == (2, 1, 3)
    # Nothing already accepted is lost by a later bad file into the same batch.
    (tmp_path / "worse.jsonl").write_text("not json\n")
    with pytest.raises(JobInputError, match="line 1: not valid JSON"):
        enqueue_file(sessions, tmp_path / "worse.jsonl", batch="bad-line", config=models)
    assert _count(sessions, "bad-line") == 2


def test_cli_prints_one_sentence_and_no_traceback(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"kind": "poem", "text": "x"}) + "\n")
    switchyard = str(Path(sys.executable).parent / "switchyard")
    env = {"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([switchyard, "enqueue", str(path), "--batch", "cli-bad"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "line 2: unknown kind 'poem'" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    missing = subprocess.run([switchyard, "enqueue", str(tmp_path / "nope.jsonl")], env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


GOOD_BATCH_NAMES = ["tickets", "tickets 2026-11-25", "x" * 200, "漢字のバッチ", "café", "👩‍👩‍👧 family",
                    "שלום", "a/b:c?d#e%f"]


@pytest.mark.parametrize(("name", "says"), BAD_BATCH_NAMES)
def test_a_bad_batch_name_gets_one_sentence(name: str, says: str) -> None:
    with pytest.raises(JobInputError) as info:
        check_batch_name(name)
    message = str(info.value)
    assert message.startswith("batch name ")
    assert says in message
    assert message.isprintable() and len(message) < 200  # the name is quoted escaped, and cut


@pytest.mark.parametrize("name", GOOD_BATCH_NAMES)
def test_a_good_batch_name_is_taken_as_it_is(name: str) -> None:
    assert check_batch_name(name) == name


def test_the_length_limits_are_the_columns() -> None:
    assert Batch.__table__.c.name.type.length == MAX_BATCH_NAME_LENGTH
    assert Job.__table__.c.key.type.length == MAX_KEY_LENGTH


def _extract(schema: object) -> dict[str, object]:
    return {"kind": "extract", "text": "Receipt for Dana, 42.50", "schema": schema}


@pytest.mark.parametrize(("schema", "message"), [
    ({"properties": {"a": {"$ref": "file:///etc/passwd"}}},
     "field 'schema' has a reference 'file:///etc/passwd' at properties/a/$ref that does not resolve inside the "
     "schema"),
    ({"$ref": "http://127.0.0.1:9/remote.json"}, "a reference 'http://127.0.0.1:9/remote.json' at $ref that"),
    ({"$id": "https://example.com/root.json", "items": {"$ref": "other.json"}},
     "a reference 'other.json' at items/$ref"),
    ({"$dynamicRef": "https://example.com/meta#m"}, "a reference 'https://example.com/meta#m' at $dynamicRef"),
    ({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/b"}, "a reference '#/$defs/b' at $ref that does not"),
    ({"properties": {"code": {"type": "string", "pattern": r"^(\w)\1$"}}},
     r"field 'schema' has a pattern '^(\\w)\\1$' at properties/code/pattern that switchyard cannot run"),
    ({"patternProperties": {"^(?=x)": {}}}, "a pattern '^(?=x)' at patternProperties that switchyard cannot run"),
    ({"$schema": "http://json-schema.org/draft-04/schema#", "patternProperties": {"(?<!a)b": {}}},
     "a pattern '(?<!a)b' at patternProperties"),
])
def test_a_schema_that_could_reach_out_or_backtrack_is_refused(schema: object, message: str) -> None:
    with pytest.raises(JobInputError) as info:
        parse_job(_extract(schema), work_tiers=TIERS)
    assert message in str(info.value)


@pytest.mark.parametrize("schema", [
    {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
    {"$id": "https://example.com/r.json", "$defs": {"i": {"$id": "i.json"}}, "items": {"$ref": "i.json"}},
    {"$defs": {"c": {"$anchor": "c"}}, "$ref": "#c"},
    {"properties": {"s": {"$ref": "https://json-schema.org/draft/2020-12/schema"}}},
    {"properties": {"w": {"type": "string", "pattern": r"^\p{L}+$"}}},  # RE2 syntax that Python's re lacks
    {"patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False},
])
def test_a_schema_confined_to_itself_is_accepted(schema: object) -> None:
    assert parse_job(_extract(schema), work_tiers=TIERS).payload["schema"] == schema


def test_cli_refuses_such_a_schema_in_one_sentence(database_url: str, tmp_path: Path) -> None:
    """The CLI's half of the refusal (a pattern takes the same path through jobspec)."""
    path = tmp_path / "jobs.jsonl"
    bad = _extract({"properties": {"a": {"$ref": "http://127.0.0.1:9/x.json"}}})
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    switchyard = str(Path(sys.executable).parent / "switchyard")
    env = {"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([switchyard, "enqueue", str(path), "--batch", "cli-schema"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert ("line 2: field 'schema' has a reference 'http://127.0.0.1:9/x.json' at properties/a/$ref that does not "
            "resolve inside the schema") in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_schema_too_large_for_the_context_is_refused_before_it_is_checked() -> None:
    """Checking a schema costs far more per byte than counting it: a huge one must not hold a
    thread of the API for minutes only to be refused for its size."""
    schema = {"$defs": {f"d{i}": {"type": "object", "properties": {"v": {"$ref": f"#/$defs/d{i}"}}}
                        for i in range(6_000)}}
    start = time.thread_time()
    with pytest.raises(JobInputError, match=r"too large for the model's context: about [\d,]+ tokens, limit 1,000"):
        parse_job(_extract(schema), work_tiers=TIERS, max_tokens=1000)
    assert time.thread_time() - start < 0.5
