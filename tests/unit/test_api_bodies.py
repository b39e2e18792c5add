"""Reading batch bodies a chunk at a time: any JSON array comes back item for item, whatever the
chunk size, and a broken body is refused at the item where it breaks."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.api import bodies
from pipeline.errors import BodyTooLarge, JobInputError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def read(body: bytes, *, chunk: int, max_items: int = 1000) -> list[tuple[int, Any]]:
    old = bodies.READ_CHUNK
    bodies.READ_CHUNK = chunk
    try:
        return list(bodies.iter_json_array(io.BytesIO(body), max_items=max_items))
    finally:
        bodies.READ_CHUNK = old


@settings(max_examples=200, deadline=None)
@given(items=st.lists(json_values, max_size=8), chunk=st.integers(1, 64), indent=st.sampled_from([None, 0, 2]),
       ascii_only=st.booleans())
def test_any_array_round_trips_at_any_chunk_size(items: list[Any], chunk: int, indent: int | None,
                                                 ascii_only: bool) -> None:
    body = json.dumps(items, indent=indent, ensure_ascii=ascii_only).encode()
    assert read(body, chunk=chunk) == list(enumerate(items))


@pytest.mark.parametrize(("body", "index", "says"), [
    (b"", 0, "must be a JSON array"),
    (b'{"kind": "x"}', 0, "must be a JSON array"),
    (b"[1,", 1, "not closed"),
    (b"[1 2]", 1, "expected ',' or ']'"),
    (b"[1,]", 1, "not valid JSON"),
    (b"[1] x", 1, "after the closing"),
    (b'["abc', 0, "Unterminated string"),
    (b"[\xff]", 0, "not valid UTF-8"),
    # Where the bad byte is, not where the chunk that holds it began.
    (b'[{"a": 1}, {"b": 2}, {"c": "\xff"}, {"d": 4}]', 2, "not valid UTF-8"),
    (b'[1, 2, 3\xff]', 2, "not valid UTF-8"),
    (b'[1, 2,\xff 3]', 2, "not valid UTF-8"),
    (b'[1, 2, "caf\xc3"]', 2, "not valid UTF-8"),
    (b"[" * 5000 + b"]" * 5000, 0, "nested too deeply"),
    # Valid JSON, but an integer longer than int() converts: refused, and named at its item.
    (b"[1, " + b"9" * 4301 + b", 3]", 1, "a number has more than 4,300 digits"),
    (b'[1, 2, {"n": [-' + b"9" * 5000 + b"]}]", 2, "a number has more than 4,300 digits"),
])
@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_broken_arrays_say_where(body: bytes, index: int, says: str, chunk: int) -> None:
    out = read(body, chunk=chunk)
    last_index, error = out[-1]
    assert isinstance(error, JobInputError)
    assert last_index == index
    assert says in str(error)


def test_item_limit_is_enforced_while_reading() -> None:
    with pytest.raises(BodyTooLarge, match="more than 3 jobs"):
        read(json.dumps([1, 2, 3, 4]).encode(), chunk=2, max_items=3)
    assert len(read(json.dumps([1, 2, 3]).encode(), chunk=2, max_items=3)) == 3


def test_json_lines_skip_blanks_and_number_lines() -> None:
    body = b'{"a": 1}\n\n  \nnot json\n\xff\n'
    out = list(bodies.iter_json_lines(io.BytesIO(body), max_items=10))
    assert [n for n, _ in out] == [1, 4, 5]
    assert out[0][1] == {"a": 1}
    assert "not valid JSON" in str(out[1][1])
    assert "not valid UTF-8" in str(out[2][1])


def test_json_lines_the_parser_cannot_read_are_named() -> None:
    body = b'{"a": 1}\n{"n": ' + b"9" * 4301 + b'}\n' + b"[" * 100_000 + b"\n"
    out = list(bodies.iter_json_lines(io.BytesIO(body), max_items=10))
    assert [n for n, _ in out] == [1, 2, 3]
    assert str(out[1][1]) == "a number has more than 4,300 digits, the most switchyard reads"
    assert str(out[2][1]) == "JSON is nested too deeply"


def test_a_byte_order_mark_is_accepted() -> None:
    """As POST /v1/jobs (json.loads) takes one: Windows tools write it."""
    for chunk in (1, 2, 65536):
        assert read(b'\xef\xbb\xbf[{"a": 1}, 2]', chunk=chunk) == [(0, {"a": 1}), (1, 2)]
    out = list(bodies.iter_json_lines(io.BytesIO(b'\xef\xbb\xbf{"a": 1}\n{"b": 2}\n'), max_items=10))
    assert out == [(1, {"a": 1}), (2, {"b": 2})]


def test_a_long_item_is_decoded_a_few_times_not_once_a_chunk() -> None:
    """An item is decoded from its start each time more of it arrives, so reading it a chunk at a
    time took time quadratic in its length (a 64 MiB string held the server for about a minute).
    Each read now takes as much again as is pending: the text decoded stays a few times the body."""
    scanned: list[int] = []

    class Counting(json.JSONDecoder):
        def raw_decode(self, s: str, idx: int = 0) -> tuple[Any, int]:
            scanned.append(len(s) - idx)
            return super().raw_decode(s, idx)

    item = {"kind": "generate", "prompt": "x" * 256 * 1024}
    body = json.dumps([item, 2]).encode()
    old = bodies.READ_CHUNK
    bodies.READ_CHUNK = 256
    try:
        reader = bodies._ArrayReader(io.BytesIO(body))
        reader.decoder = Counting()
        items = []
        for value in bodies._array_items(reader, max_items=10):
            items.append(value)
            reader.index += 1
    finally:
        bodies.READ_CHUNK = old
    assert items == [item, 2]
    assert sum(scanned) < 4 * len(body), (len(scanned), sum(scanned))
