"""A tenant's JSON Schema is checked against a model's answer without any I/O and in bounded CPU:
references resolve only inside the schema, patterns run on a linear-time engine, and a schema
that cannot be used is a failed verdict with a reason, never an exception out of the stage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.flow.schema_check import CPU_BUDGET_S
from pipeline.flow.validation import Verdict, check_schema
from tests.listener import LEAKED, Listener, listening


@pytest.fixture
def listener() -> Iterator[Listener]:
    with listening() as lst:
        yield lst


def _external(url: str, secret_file: Path) -> list[tuple[dict[str, Any], str]]:
    """(schema, the reference as the verdict must name it): every way a schema can point outside."""
    return [
        ({"properties": {"a": {"$ref": secret_file.as_uri()}}}, secret_file.as_uri()),
        ({"$ref": f"{url}/remote.json"}, f"{url}/remote.json"),
        # Relative to the schema's own $id, which names the listener.
        ({"$id": f"{url}/schemas/root.json", "properties": {"a": {"$ref": "other.json"}}}, "other.json"),
        ({"$dynamicRef": f"{url}/dynamic.json#meta"}, f"{url}/dynamic.json#meta"),
        ({"$schema": "https://json-schema.org/draft/2019-09/schema", "$recursiveAnchor": True,
          "properties": {"a": {"$ref": f"{url}/recursive.json"}}}, f"{url}/recursive.json"),
        ({"$schema": "http://json-schema.org/draft-04/schema#", "id": f"{url}/d4/root.json",
          "properties": {"a": {"$ref": "sibling.json"}}}, "sibling.json"),
    ]


def test_no_reference_reaches_a_file_or_the_network(listener: Listener, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"type": "object", "required": ["leaked-from-a-file"],
                                  "properties": {"x": {"enum": ["leaked-enum-value"]}}}))
    for schema, ref in _external(listener.url, secret):
        verdict = check_schema('{"a": {"x": 1}, "b": 2}', schema)
        assert not verdict.ok, schema
        assert ref in verdict.feedback, verdict.problems
        assert "does not resolve inside the schema" in verdict.feedback
        assert "leaked" not in verdict.feedback
    assert listener.requests == []
    assert LEAKED  # what a retrieval would have brought back, had there been one


def test_references_inside_the_schema_still_resolve() -> None:
    tree = {"$defs": {"node": {"type": "object", "required": ["name"],
                               "properties": {"name": {"type": "string"},
                                              "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"}
    anchored = {"$defs": {"code": {"$anchor": "code", "type": "string", "maxLength": 3}},
                "properties": {"c": {"$ref": "#code"}}}
    # An $id-relative reference to a subschema that declares that $id is inside the schema.
    by_id = {"$id": "https://example.com/root.json",
             "$defs": {"item": {"$id": "item.json", "type": "integer"}},
             "properties": {"n": {"$ref": "item.json"}}}
    # A generic list whose items the outer schema narrows to strings through $dynamicRef.
    dynamic = {"$id": "https://example.com/strings", "$ref": "list",
               "$defs": {"item": {"$dynamicAnchor": "item", "type": "string"},
                         "list": {"$id": "list", "type": "array", "items": {"$dynamicRef": "#item"},
                                  "$defs": {"any": {"$dynamicAnchor": "item"}}}}}
    meta = {"properties": {"s": {"$ref": "https://json-schema.org/draft/2020-12/schema"}}}
    cases: list[tuple[dict[str, Any], Any, Any]] = [
        (tree, {"name": "a", "children": [{"name": "b", "children": []}]}, {"name": "a", "children": [{}]}),
        (anchored, {"c": "abc"}, {"c": "abcd"}),
        (by_id, {"n": 3}, {"n": "three"}),
        (dynamic, ["a", "b"], ["a", 1]),
        (meta, {"s": {"type": "string"}}, {"s": {"type": 5}}),
    ]
    for schema, good, bad in cases:
        assert check_schema(json.dumps(good), schema).ok, schema
        verdict = check_schema(json.dumps(bad), schema)
        assert not verdict.ok and "does not resolve" not in verdict.feedback, verdict.problems


def _in_thread(schema: dict[str, Any], answer: str) -> Verdict:
    """Run the check on a thread, as a threads-pool worker does (its stack, not the main one)."""
    out: list[Verdict] = []
    thread = threading.Thread(target=lambda: out.append(check_schema(answer, schema)))
    thread.start()
    thread.join(30)
    assert out, "the check raised instead of returning a verdict"
    return out[0]


@pytest.mark.parametrize(("schema", "says"), [
    ({"$ref": "#/$defs/missing"}, "'#/$defs/missing' that does not resolve inside the schema"),
    ({"properties": {"a": {"$ref": "#nowhere"}}}, "'#nowhere' that does not resolve inside the schema"),
    ({"$ref": "#"}, "refers to itself without end"),
    ({"$schema": "https://json-schema.org/draft/2019-09/schema", "$recursiveRef": "#"}, "refers to itself"),
    # Stored before patterns were checked at submission: RE2 has no backreference.
    ({"properties": {"a": {"type": "string", "pattern": r"(a)\1"}}}, r"pattern '(a)\\1'"),
])
def test_a_schema_that_cannot_be_used_is_a_verdict_not_an_exception(schema: dict[str, Any], says: str) -> None:
    verdict = _in_thread(schema, '{"a": "aa"}')
    assert not verdict.ok and says in verdict.feedback, verdict.problems


# -- CPU -----------------------------------------------------------------------------------------

def _checks_in_subprocess(cases: list[tuple[dict[str, Any], Any]], *, timeout: float,
                          budget_s: float | None = None) -> list[dict[str, Any]]:
    """check_schema on each (schema, answer) in a child process: a check that backtracks for hours
    cannot be interrupted in this one (the regex engine holds the GIL), but a child can be killed.
    ``budget_s`` shortens the CPU budget, to keep the test quick."""
    code = textwrap.dedent("""
        import json, sys, time
        from pipeline.flow import schema_check
        from pipeline.flow.validation import check_schema
        cases, budget = json.loads(sys.stdin.read())
        if budget is not None:
            schema_check.CPU_BUDGET_S = budget
        for schema, answer in cases:
            start = time.thread_time()
            verdict = check_schema(json.dumps(answer), schema)
            print(json.dumps({"ok": verdict.ok, "feedback": verdict.feedback, "cpu": time.thread_time() - start}))
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps([cases, budget_s]), capture_output=True,
                             text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"checking answers against {json.dumps([s for s, _ in cases])[:300]} ran for over {timeout} s")
    return [json.loads(line) for line in out.stdout.splitlines()]


EVIL = "^(a+)+$"
EVIL_TEXT = "a" * 40 + "b"
# (keyword, schema, answer, whether the answer passes): Python's re takes hours over each.
CATASTROPHIC: list[tuple[str, dict[str, Any], Any, bool]] = [
    ("pattern", {"type": "string", "pattern": EVIL}, EVIL_TEXT, False),
    ("patternProperties", {"patternProperties": {EVIL: {"type": "integer"}}}, {EVIL_TEXT: "x"}, True),
    ("additionalProperties", {"patternProperties": {EVIL: True}, "additionalProperties": False}, {EVIL_TEXT: 1},
     False),
    ("unevaluatedProperties", {"patternProperties": {EVIL: True}, "unevaluatedProperties": False}, {EVIL_TEXT: 1},
     False),
    ("unevaluatedProperties-2019", {"$schema": "https://json-schema.org/draft/2019-09/schema",
                                    "patternProperties": {EVIL: True}, "unevaluatedProperties": False},
     {EVIL_TEXT: 1}, False),
    ("propertyNames", {"propertyNames": {"pattern": EVIL}}, {EVIL_TEXT: 1}, False),
]


def test_a_catastrophic_pattern_runs_in_linear_time() -> None:
    results = _checks_in_subprocess([(schema, answer) for _, schema, answer, _ in CATASTROPHIC], timeout=30)
    for (keyword, _, _, ok), result in zip(CATASTROPHIC, results, strict=True):
        assert result["ok"] is ok, (keyword, result)
        assert result["cpu"] < 0.5, (keyword, result)


def test_patterns_keep_their_json_schema_meaning() -> None:
    # ECMA-262's \\uXXXX escape, which RE2 spells differently; and a search, not a full match.
    assert check_schema('"ABA"', {"pattern": "^\\u0041[\\u0041-\\u0042]+$"}).ok
    assert not check_schema('"ABC"', {"pattern": "^\\u0041[\\u0041-\\u0042]+$"}).ok
    assert check_schema('"xx-12-yy"', {"pattern": "[0-9]{2}"}).ok
    assert check_schema('"a\\\\u0041"', {"pattern": "^a\\\\u0041$"}).ok  # an escaped backslash stays one


def _explosive(levels: int, *, dialect: str | None = None) -> dict[str, Any]:
    """Each level of anyOf doubles the paths to the leaf: 2^levels checks of an answer it rejects."""
    defs: dict[str, Any] = {f"l{i}": {"anyOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]}
                            for i in range(levels)}
    defs[f"l{levels}"] = {"type": "string"}
    if dialect:  # every subschema names its draft, which jsonschema would check with its plain class
        defs = {name: {"$schema": dialect, **sub} for name, sub in defs.items()}
    return {"$defs": defs, "$ref": "#/$defs/l0"}


def test_a_schema_whose_check_explodes_is_stopped() -> None:
    cases = [(_explosive(30), 1), (_explosive(30, dialect="https://json-schema.org/draft/2020-12/schema"), 1)]
    for result in _checks_in_subprocess(cases, timeout=30, budget_s=0.3):
        assert not result["ok"] and "too costly to check" in result["feedback"], result
        assert result["cpu"] < 1, result
    # The budget shipped is the one this test shortens, and an honest schema is far inside it.
    assert CPU_BUDGET_S == 2
    start = time.thread_time()
    assert not check_schema("1", _explosive(8)).ok
    assert time.thread_time() - start < CPU_BUDGET_S / 10


def test_odd_answers_are_verdicts() -> None:
    # Python refuses to read an integer of more than 4,300 digits (a guard against quadratic time).
    huge = check_schema("1" * 5000, {"type": "integer"})
    assert not huge.ok and "not valid JSON" in huge.feedback
    # An unclosed code fence of whitespace: the fence is stripped in linear time.
    start = time.monotonic()
    fenced = check_schema("```" + " " * 20_000 + "x", {"type": "object"})
    assert not fenced.ok and time.monotonic() - start < 0.5
    assert check_schema('```json\n{"a": 1}\n```', {"type": "object"}).output == {"a": 1}


@pytest.mark.parametrize(("schema", "answer", "ok"), [
    # An integer past a double's range (309 digits or more), which a model writes if a job asks it
    # to: jsonschema divides it by a float multipleOf in floating point, outside its own guard.
    ({"type": "number", "multipleOf": 0.1}, "1" + "0" * 400, True),
    ({"type": "number", "multipleOf": 0.3}, "1" + "0" * 400, False),
    ({"type": "number", "multipleOf": 1e-300}, "-" + "7" * 4000, True),
    ({"properties": {"n": {"multipleOf": 0.5}}}, '{"n": ' + "3" * 500 + "}", True),
    # A float answer against an integer multipleOf past a double's range.
    ({"multipleOf": int("9" * 400)}, "1.5", False),
    ({"multipleOf": int("9" * 400)}, "0.0", True),
    # And the plain cases are unchanged.
    ({"multipleOf": 0.1}, "0.30000000000000004", False),
    ({"multipleOf": 3}, "9", True),
])
def test_multiple_of_checks_numbers_of_any_size(schema: dict[str, Any], answer: str, ok: bool) -> None:
    verdict = check_schema(answer, schema)
    assert verdict.ok is ok, verdict.problems
    if not ok:
        assert "is not a multiple of" in verdict.feedback


@pytest.mark.parametrize("answer", ['{"price": NaN}', '{"price": Infinity}', '[-Infinity]', '{"price": 1e400}', "NaN"])
def test_an_answer_json_cannot_hold_is_not_valid_json(answer: str) -> None:
    """Python's parser reads NaN and infinities (and 1e400 as infinity), which JSON has no way to
    write: Postgres refuses them in the job's output, so passing them would crash the stage that
    stores it. Refused as unreadable, like any answer that is not JSON."""
    for schema in ({"type": ["object", "array", "number"]}, {"multipleOf": 0.1}):
        verdict = check_schema(answer, schema)
        assert not verdict.ok
        assert verdict.problems == ["answer is not valid JSON"]
