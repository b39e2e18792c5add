"""Fuzzing the job parser and the enqueue path (hypothesis): every input is either a valid job or
rejected with one clear sentence. Nothing crashes and nothing is half-written."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig, load_config
from pipeline.errors import JobInputError
from pipeline.intake.enqueue import enqueue_file
from pipeline.intake.jobspec import JobSpec, _parse_plain, _plain_spec, max_job_tokens, parse_job, parse_line
from pipeline.models import Batch, Job, JobKind

CONFIG = load_config()
TIERS = CONFIG.work_tiers
LIMIT = max_job_tokens(CONFIG)

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=30) | st.sampled_from(["", "\x00", "\ud800", "a\x00b", " "]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
FIELDS = ["key", "kind", "text", "labels", "schema", "instructions", "context", "prompt", "tier", "metadata",
          "extra"]
good_values = {
    "kind": st.sampled_from(["classify", "extract", "draft", "generate", "summarise", "", "CLASSIFY"]),
    "tier": st.sampled_from(["sonnet", "opus", "haiku", "gpt"]),
    "labels": st.lists(st.text(max_size=10), max_size=4),
    "schema": st.sampled_from([{"type": "object"}, {"type": "nope"}, {"required": "name"}, {"minimum": "x"},
                               {"$ref": "#/nowhere"}, {"properties": {"a": {"type": 3}}}, True]),
}
field_value = {name: (good_values.get(name, st.nothing()) | json_values | st.text(max_size=40)) for name in FIELDS}
job_objects = st.fixed_dictionaries({}, optional=field_value)


def nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"a": [leaf]}
    return leaf


def check_valid(spec: JobSpec) -> None:
    """What a job that passed must be: storable in Postgres text and JSONB, keyed, sized."""
    assert spec.key
    assert len(spec.key) <= 200
    stored = json.dumps({"payload": spec.payload, "metadata": spec.metadata, "key": spec.key}, ensure_ascii=False)
    stored.encode("utf-8")  # no lone surrogates
    assert "\x00" not in stored  # Postgres text and JSONB refuse NUL
    assert "\\u0000" not in stored


def check_message(exc: JobInputError) -> None:
    message = str(exc)
    assert message
    assert "\n" not in message
    assert "Traceback" not in message
    assert len(message) < 500, message


@settings(max_examples=400, deadline=None)
@given(job_objects)
def test_parse_job_accepts_or_explains(obj: dict[str, Any]) -> None:
    try:
        spec = parse_job(obj, work_tiers=TIERS, max_tokens=LIMIT)
    except JobInputError as exc:
        check_message(exc)
    else:
        check_valid(spec)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | job_objects.map(lambda o: json.dumps(o).encode()))
def test_parse_line_accepts_or_explains(raw: bytes) -> None:
    try:
        spec = parse_line(raw, work_tiers=TIERS, max_tokens=LIMIT)
    except JobInputError as exc:
        check_message(exc)
    else:
        check_valid(spec)


@pytest.mark.parametrize("raw", [
    b"\xff\xfe{}", b'{"kind": "generate", "prompt": "caf\xc3"}', b"\x00", b'{"kind":"generate","prompt":"a\\u0000"}',
    b'{"kind":"generate","prompt":"\\ud800"}', b'{"kind":"generate","prompt":"x","key":"k\\u0000"}',
    b'{"kind":"generate","prompt":"x","metadata":{"a":"\\u0000"}}',
    b'{"kind":"classify","text":"x","labels":["a\\u0000"]}', b'{"kind":"classify","text":"x","labels":["\\udfff"]}',
    b'{"kind":"generate","prompt":"x","metadata":{"\\u0000":1}}',
    b"[" * 100_000, b'{"kind":"generate","prompt":"x","metadata":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
    json.dumps({"kind": "generate", "prompt": "x", "metadata": nested(300, 1)}).encode(),
    json.dumps({"kind": "extract", "text": "x", "schema": nested(300, {"type": "object"})}).encode(),
    json.dumps({"kind": "generate", "prompt": "x" * 2_000_000}).encode(),
    json.dumps({"kind": "generate", "prompt": "x", "key": "k" * 1000}).encode(),
    json.dumps({"kind": "generate", "prompt": "x", "tier": ["opus"]}).encode(),
    json.dumps({"kind": ["generate"], "prompt": "x"}).encode(),
    json.dumps({"kind": "generate", "prompt": 12}).encode(),
    # More digits than int() converts: the standard parser raises a plain ValueError for it.
    b'{"kind":"generate","prompt":"x","metadata":{"n":' + b"9" * 4301 + b"}}", b"-" + b"9" * 5000,
    b'{"kind":' + b"1" * 4301 + b', "prompt":"x"}', b'{"kind":"generate","prompt":"x","key":' + b"1" * 4301 + b"}",
])
def test_hostile_lines_are_explained(raw: bytes) -> None:
    try:
        spec = parse_line(raw, work_tiers=TIERS, max_tokens=LIMIT)
    except JobInputError as exc:
        check_message(exc)
    else:
        check_valid(spec)


def _outcome(line: str | bytes) -> tuple[Any, ...]:
    try:
        s = parse_line(line, work_tiers=TIERS, max_tokens=LIMIT)
    except JobInputError as exc:
        return ("refused", str(exc))
    return ("accepted", s, json.dumps(s.payload), json.dumps(s.metadata))  # exact numbers, not only equal ones


# Numbers orjson reads differently from the standard parser (past 64 bits it rounds to a float).
big_numbers = st.sampled_from([10**25, -(10**25), 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 1e300, 1e16])
any_values = st.recursive(scalars | big_numbers, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
mixed_objects = st.fixed_dictionaries({}, optional={name: (good_values.get(name, st.nothing()) | any_values)
                                                    for name in FIELDS})
# Mostly valid jobs, so that what is stored is compared, not only which message is given.
valid_jobs = st.one_of(
    st.fixed_dictionaries({"kind": st.just("generate"), "prompt": st.text(min_size=1, max_size=20)},
                          optional={"metadata": st.dictionaries(st.text(max_size=5), any_values, max_size=4),
                                    "key": st.text(min_size=1, max_size=10)}),
    st.fixed_dictionaries({"kind": st.just("extract"), "text": st.just("x"),
                           "schema": st.fixed_dictionaries({"type": st.just("object")},
                                                           optional={"maximum": big_numbers,
                                                                     "x": any_values})}),
)


@settings(max_examples=400, deadline=None)
@given(mixed_objects | valid_jobs, st.booleans())
def test_both_decoders_agree(obj: dict[str, Any], ascii_only: bool) -> None:
    """Bytes are decoded by orjson, text by the standard parser: the same line gives the same job
    or the same message either way."""
    line = json.dumps(obj, ensure_ascii=ascii_only)
    try:
        raw = line.encode()
    except UnicodeEncodeError:
        return  # a lone surrogate written raw: as bytes that is not UTF-8, so not the same line
    assert _outcome(raw) == _outcome(line)


# Jobs near the common shape, each field sometimes wrong: what the plain path (_parse_plain) must
# take exactly as the general one does, or leave to it.
near_plain = st.fixed_dictionaries(
    {"kind": st.sampled_from(["classify", "extract", "draft", "generate"]) | any_values},
    optional={"key": st.text(max_size=10) | st.just("k" * 201) | any_values,
              "text": st.text(max_size=20) | any_values, "prompt": st.text(max_size=20) | any_values,
              "instructions": st.text(max_size=20) | any_values, "context": st.text(max_size=20) | any_values,
              "labels": st.lists(st.sampled_from(["a", "b", " ", "", "é"]), max_size=3) | any_values,
              "schema": good_values["schema"] | any_values,
              "tier": st.sampled_from(["sonnet", "opus", "haiku"]) | any_values,
              "metadata": st.dictionaries(st.text(max_size=5), scalars | big_numbers, max_size=3) | any_values,
              "task": st.just("t"), "extra": any_values})


@settings(max_examples=600, deadline=None)
@given(near_plain | mixed_objects | valid_jobs, st.booleans())
def test_the_plain_path_takes_only_what_the_general_path_takes(obj: dict[str, Any], ascii_only: bool) -> None:
    """A line the plain path accepts is the job the standard parser and the general checks make of
    it, exact numbers and all; anything else it leaves to them."""
    line = json.dumps(obj, ensure_ascii=ascii_only)
    try:
        decoded = orjson.loads(line.encode())
    except (UnicodeEncodeError, orjson.JSONDecodeError):
        return  # never reaches the plain path
    if "\\u0000" in line:
        return  # nor does a line that may hold a NUL
    spec = _parse_plain(decoded, TIERS, LIMIT)
    if spec is not None:
        assert _outcome(line) == ("accepted", spec, json.dumps(spec.payload), json.dumps(spec.metadata))


@pytest.mark.parametrize("obj", [
    {"key": "a", "kind": "classify", "text": "hello", "labels": ["x", "y"]},
    {"kind": "extract", "text": "x", "schema": {"type": "object"}, "metadata": {"n": 1, "s": "x", "b": None}},
    {"key": "d", "kind": "draft", "instructions": "x", "context": "", "tier": TIERS[0]},
    {"kind": "generate", "prompt": "今日は", "metadata": {"nested": {"a": [1.5]}}},
])
def test_common_jobs_take_the_plain_path(obj: dict[str, Any]) -> None:
    spec = _parse_plain(orjson.loads(json.dumps(obj)), TIERS, LIMIT)
    assert spec is not None
    assert spec == parse_job(obj, work_tiers=TIERS, max_tokens=LIMIT)


def test_the_plain_path_makes_a_whole_jobspec() -> None:
    """_plain_spec bypasses JobSpec's __init__: it must set every field, and nothing else."""
    spec = _plain_spec("k", JobKind.GENERATE, {"prompt": "x"}, None, "opus")
    assert spec == JobSpec(key="k", kind=JobKind.GENERATE, payload={"prompt": "x"}, metadata=None, tier="opus")
    assert vars(spec).keys() == {f.name for f in dataclasses.fields(JobSpec)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.key = "other"  # type: ignore[misc]


# Number literals as a user may type them, of any length: past 4,300 integer digits int() refuses
# them, past about 309 they overflow a double, far below zero they round to 0. json.dumps cannot
# write the first kind, so the strategies above never make one.
number_literals = st.builds(
    lambda sign, digits, fraction, exponent: sign + digits + fraction + exponent,
    st.sampled_from(["", "-"]),
    (st.sampled_from([1, 19, 20, 309, 310, 4300, 4301, 6000]) | st.integers(1, 6000))
    .flatmap(lambda n: st.sampled_from(["9" * n, "1" + "0" * (n - 1)])),
    st.sampled_from(["", ".5", "." + "3" * 5000]),
    st.sampled_from(["", "e400", "E-400", "e+2", "e-5000"]),
)


@settings(max_examples=150, deadline=None)
@given(number_literals, st.sampled_from(['{"kind":"generate","prompt":"x","metadata":{"n":%s}}',
                                         '{"kind":"generate","prompt":"x","key":%s}',
                                         '{"kind":"extract","text":"x","schema":{"type":"number","maximum":%s}}',
                                         '%s']))
def test_numbers_of_any_length_are_read_or_explained(literal: str, template: str) -> None:
    line = template % literal
    outcome = _outcome(line)
    assert _outcome(line.encode()) == outcome
    if outcome[0] == "refused":
        assert len(outcome[1]) < 500


@pytest.mark.parametrize("depth", [64, 65, 300, 1023])
def test_both_decoders_agree_on_depth(depth: int) -> None:
    nest = '{"a":' * depth + "1" + "}" * depth
    for line in ('{"kind":"extract","text":"x","schema":{"type":"object","x":' + nest + "}}",
                 '{"kind":"generate","prompt":"x","metadata":' + nest + "}"):
        assert _outcome(line.encode()) == _outcome(line)


def test_a_deeply_nested_schema_is_rejected_not_crashed() -> None:
    deep = '{"kind": "extract", "text": "x", "schema": ' + '{"not": ' * 900 + "{}" + "}" * 901
    with pytest.raises(JobInputError, match="nested more than 64 levels deep") as info:
        parse_line(deep, work_tiers=TIERS, max_tokens=LIMIT)
    check_message(info.value)


# -- the enqueue path, on the real Postgres ---------------------------------------------------------


def _count(sessions: sessionmaker[Session], name: str) -> tuple[int, int]:
    with sessions() as s:
        batch = s.scalar(select(Batch.id).where(Batch.name == name))
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch)) if batch else 0
    return (1 if batch else 0), int(jobs or 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(job_objects, min_size=1, max_size=6), st.booleans())
def test_enqueue_writes_all_or_nothing(sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
                                       objs: list[dict[str, Any]], skip_invalid: bool) -> None:
    name = f"fuzz-{uuid.uuid4().hex[:10]}"
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(b"".join(json.dumps(o).encode() + b"\n" for o in objs))
    valid: dict[str, JobSpec] = {}
    for o in objs:
        try:
            spec = parse_job(o, work_tiers=TIERS, max_tokens=LIMIT)
        except JobInputError:
            continue
        valid.setdefault(spec.key, spec)
    all_valid = len(valid) > 0 and all(_ok(o) for o in objs)
    try:
        report = enqueue_file(sessions, path, batch=name, config=models, skip_invalid=skip_invalid)
    except JobInputError as exc:
        check_message(exc)
        assert not skip_invalid
        assert not all_valid
        assert _count(sessions, name) == (0, 0)  # nothing half-written
        return
    assert skip_invalid or all(_ok(o) for o in objs)
    assert report.accepted == _count(sessions, name)[1]
    assert report.accepted + report.duplicates + report.invalid_count == report.read == len(objs)


def _ok(o: dict[str, Any]) -> bool:
    try:
        parse_job(o, work_tiers=TIERS, max_tokens=LIMIT)
    except JobInputError:
        return False
    return True


def test_a_key_reused_with_different_content_is_rejected(sessions: sessionmaker[Session], models: ModelConfig,
                                                         tmp_path: Path) -> None:
    a = {"key": "k1", "kind": "generate", "prompt": "first"}
    b = {"key": "k1", "kind": "generate", "prompt": "second"}
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    with pytest.raises(JobInputError, match="line 2: key 'k1' was already used in this batch for a different job"):
        enqueue_file(sessions, path, batch="dup-in-file", config=models)
    assert _count(sessions, "dup-in-file") == (0, 0)

    # Across runs: the batch has k1 as "first"; a later file that reuses k1 for "second" is refused.
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps(a) + "\n")
    assert enqueue_file(sessions, first, batch="dup-across", config=models).accepted == 1
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"key": "k2", "kind": "generate", "prompt": "new"}) + "\n" + json.dumps(b) + "\n")
    with pytest.raises(JobInputError, match="line 2: key 'k1' was already used in this batch for a different job"):
        enqueue_file(sessions, second, batch="dup-across", config=models)
    assert _count(sessions, "dup-across") == (1, 1)  # k2 was not written either
    # The same content again is an idempotent re-run, not a conflict.
    assert enqueue_file(sessions, first, batch="dup-across", config=models).duplicates == 1
