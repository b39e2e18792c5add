"""Request bodies, read as streams.

A body is copied to a spooled temporary file as it arrives (memory up to ``SPOOL_IN_MEMORY``,
then disk), counting bytes: past the limit the request is refused with 413 at once, not after
the whole body was buffered. The spool is then read by ``enqueue_items`` one item at a time
(again, if a new batch's body repeats a key), so a large batch never sits in memory as Python
objects.
"""

from __future__ import annotations

import codecs
import json
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from starlette.requests import Request

from pipeline.errors import BodyTooLarge, JobInputError, UnsupportedMediaType
from pipeline.intake.jobspec import decode_json, json_limits

SPOOL_IN_MEMORY = 1024 * 1024
READ_CHUNK = 64 * 1024

JSON = "application/json"
JSON_LINES = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/x-jsonlines")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def spool(request: Request, *, max_bytes: int) -> IO[bytes]:
    """Copy the body to a temporary file, refusing it as soon as it passes ``max_bytes``. A body is
    read as sent: a compressed one is refused by its Content-Encoding, before any of it is read."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
    declared = request.headers.get("content-length", "")
    # An early refusal only: the copy below bounds the body whatever the header says. The HTTP
    # server refuses a Content-Length that is not ASCII digits; should one get through, it is
    # ignored (str.isdigit takes '²', which int() refuses, and int() refuses thousands of digits).
    if declared.isascii() and declared.isdigit() and len(declared) <= 18 and int(declared) > max_bytes:
        raise BodyTooLarge(f"request body is {int(declared):,} bytes, over the limit of {max_bytes:,}")
    fh = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - returned to the caller
    try:
        await _copy(request, fh, max_bytes=max_bytes)
    except BaseException:
        fh.close()
        raise
    fh.seek(0)
    return fh


async def _copy(request: Request, fh: IO[bytes], *, max_bytes: int) -> None:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"request body is over the limit of {max_bytes:,} bytes")
        fh.write(chunk)


def _too_many(max_items: int) -> BodyTooLarge:
    return BodyTooLarge(f"batch has more than {max_items:,} jobs, the limit for one request; split it")


def iter_json_lines(fh: IO[bytes], *, max_items: int) -> Iterator[tuple[int, Any | JobInputError]]:
    """(line number, decoded object or the error for that line), skipping blank lines."""
    fh.seek(0)
    count = 0
    for number, raw in enumerate(fh, start=1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        count += 1
        if count > max_items:
            raise _too_many(max_items)
        yield number, _decode(raw)


def _decode(raw: bytes) -> Any | JobInputError:
    try:
        return decode_json(raw)
    except JobInputError as exc:
        return exc


# Longer than any JSON literal or the tail of a number that could be cut off ("-Infinity").
_MARGIN = 16


class _ArrayReader:
    """Walks a JSON array in a byte stream, holding only the current item's text.

    Bytes that are not UTF-8 are refused where they are: the text before them is read as usual,
    and the error is raised only when the walk needs text past it, so it names the item they
    fall in (not the item being read when the chunk holding them arrived)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False
        self.index = 0  # of the item being read
        self.read_bytes = 0
        self.started = False  # a byte-order mark may open the body
        self.bad_utf8: str | None = None  # the refusal waiting at the end of the text decoded so far

    def more(self) -> bool:
        """Read on. A value is decoded again from its start each time more of it arrives, so each
        read takes at least as much again as is pending: a value spanning n chunks is decoded
        about log n times, not n (a 64 MiB string took a minute, quadratic in its length)."""
        if self.eof or self.bad_utf8 is not None:
            return False
        data = self.fh.read(max(READ_CHUNK, len(self.buf) - self.pos))
        pending = self.utf8.getstate()[0]  # the start of a character cut by the previous chunk
        try:
            text = self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            text = (pending + data)[:exc.start].decode("utf-8")
            self.bad_utf8 = f"not valid UTF-8 (byte {self.read_bytes - len(pending) + exc.start:,} of the body)"
        self.read_bytes += len(data)
        self.eof = not data
        if text and not self.started:
            text, self.started = text.removeprefix("\ufeff"), True
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        return True

    def peek(self) -> str:
        """The next non-blank character, reading more as needed; '' at the end of the body."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                if self.bad_utf8:
                    raise JobInputError(self.bad_utf8)
                return ""

    def value(self) -> Any:
        """Decode the value at the current position, reading more until it is complete. A value
        that ends, or fails, near where the text read so far ends is decoded again with more text:
        a number or a literal cut by a chunk boundary (``1.5e|10``, ``tr|ue``) is not complete."""
        if self.peek() == "":
            raise JobInputError("the array is not closed: the body ends where an item should be")
        while True:
            try:
                with json_limits():
                    value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # Cut short by the chunk, or wrong? Only the former is worth reading more for.
                truncated = exc.pos >= len(self.buf) - _MARGIN or exc.msg.startswith("Unterminated string")
                if truncated and self.more():
                    continue
                raise JobInputError(self.bad_utf8 if truncated and self.bad_utf8 else f"not valid JSON: {exc.msg}"
                                    ) from None
            if end >= len(self.buf) - _MARGIN and self.more():
                continue
            if end == len(self.buf) and self.bad_utf8:
                raise JobInputError(self.bad_utf8)  # the value runs into the bad byte
            self.pos = end
            return value


def iter_json_array(fh: IO[bytes], *, max_items: int) -> Iterator[tuple[int, Any | JobInputError]]:
    """(index, decoded item) for each item of a JSON array, decoded one item at a time.

    A body that is not an array, or breaks off, yields one error at the index where it went wrong
    and stops: nothing after it can be trusted."""
    fh.seek(0)
    reader = _ArrayReader(fh)
    try:
        for item in _array_items(reader, max_items=max_items):
            yield reader.index, item
            reader.index += 1
    except JobInputError as exc:
        yield reader.index, exc


def _array_items(r: _ArrayReader, *, max_items: int) -> Iterator[Any]:
    """The items; the caller advances ``r.index`` past each one it has taken."""
    if r.peek() != "[":
        raise JobInputError("request body must be a JSON array of jobs (or JSON Lines, with Content-Type "
                            "application/x-ndjson)")
    r.pos += 1
    if r.peek() == "]":
        r.pos += 1
    else:
        while True:
            if r.index >= max_items:
                raise _too_many(max_items)
            yield r.value()
            sep = r.peek()
            r.pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise JobInputError("expected ',' or ']' after the previous item" if sep else
                                    "the array is not closed: the body ends before ']'")
    if r.peek() != "":
        raise JobInputError("unexpected data after the closing ']' of the array")
