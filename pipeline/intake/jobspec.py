"""What a job is, as the user writes it, and the checks that turn a line of input into one.

Every check raises ``JobInputError`` with one sentence naming the field and the problem; the
caller adds where (file and line). Nothing here touches the database.

A line of JSON Lines is decoded by orjson when it can be, about twice as fast as the standard
library, which is a good part of enqueueing a large file. The standard parser stays the reference:
a line orjson refuses, a job found bad, or a number orjson would round (an integer past 64 bits)
is decoded again the standard way, so what is accepted, what is stored and every message are the
same whichever parser read the line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.config import ModelConfig
from pipeline.errors import JobInputError
from pipeline.flow import schema_check
from pipeline.models import JobKind
from pipeline.names import quoted

MAX_KEY_LENGTH = 200  # jobs.key
# Characters per token for the size estimate at enqueue time. Deliberately pessimistic (real
# English runs ~4): a job rejected here would have failed at the API anyway.
CHARS_PER_TOKEN = 3.5
# Outside ASCII a character is often a token or more (CJK, emoji): such text is counted by its
# UTF-8 bytes instead, two bytes a token, so a page of Chinese is not taken for a quarter of its size.
NON_ASCII_BYTES_PER_TOKEN = 2.0
# The prompts' own text (system prompt, section tags) around the job; tests/unit/test_context_limit
# checks the real prompts stay under it.
PROMPT_SCAFFOLD_TOKENS = 600
# Validation feedback shown to a retried work call is cut to this (pipeline.flow.prompts).
FEEDBACK_MAX_CHARS = 4_000

_FIELDS: dict[JobKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required text fields, optional text fields)
    JobKind.CLASSIFY: (("text",), ()),
    JobKind.EXTRACT: (("text",), ()),
    JobKind.DRAFT: (("instructions",), ("context",)),
    JobKind.GENERATE: (("prompt",), ()),
}
# Nested JSON (metadata, a schema) deeper than this is refused: Postgres, jsonschema and our own
# digest all recurse through it, and no honest job needs more.
MAX_DEPTH = 64
# Metadata rides along with the job and is not sent to the model, so the context check does not
# bound it; this does.
MAX_METADATA_BYTES = 65_536

_COMMON = {"key", "kind", "tier", "metadata"}
_EXTRA = {JobKind.CLASSIFY: {"labels"}, JobKind.EXTRACT: {"schema"}}
# Every field a job of some kind may have, with or without a task: the columns a CSV file may name.
JOB_FIELDS = frozenset(_COMMON | {f for req, opt in _FIELDS.values() for f in (*req, *opt)}
                       | {f for extra in _EXTRA.values() for f in extra} | {"task", "task_version"})
_ALLOWED = {kind: frozenset(_COMMON | set(req) | set(opt) | _EXTRA.get(kind, set()))
            for kind, (req, opt) in _FIELDS.items()}
# A job under a task: the same fields, but the task gives its labels or schema.
_TASK_ALLOWED = {kind: (fields - {"labels", "schema"}) | {"task", "task_version"} for kind, fields in _ALLOWED.items()}
_KINDS = {kind.value: kind for kind in JobKind}
# orjson reads an integer past 64 bits as a float, rounding it; the standard parser keeps it exact.
_FLOAT_EXACT_BELOW = 2.0**63
# What json.dumps(value, ensure_ascii=False) writes, without building a new encoder each call (it
# does whenever given an option), which was most of what measuring a job's metadata cost.
_encode_unicode = json.JSONEncoder(ensure_ascii=False).encode
# The types of a metadata value that needs no walk to be storable (see _parse_plain).
_FLAT = frozenset({str, int, bool, type(None)})


@dataclass(frozen=True)
class JobSpec:
    key: str
    kind: JobKind
    payload: dict[str, Any]
    metadata: dict[str, Any] | None
    tier: str | None
    task_id: int | None = None  # the version of the task the job was bound to, if it names one

    def content_digest(self) -> str:
        content: dict[str, Any] = {"kind": self.kind.value, "payload": self.payload, "tier": self.tier,
                                   "metadata": self.metadata}
        if self.task_id is not None:  # only then: the digests (and keys) of jobs without a task stay as they were
            content["task_id"] = self.task_id
        return digest(content)


_new_object = object.__new__


def _plain_spec(key: str, kind: JobKind, payload: dict[str, Any], metadata: dict[str, Any] | None,
                tier: str | None) -> JobSpec:
    """JobSpec(key=..., ..., task_id=None), made without its __init__: a frozen dataclass sets each
    field through object.__setattr__, and that was a third of checking a plain job. The object is
    the same (tests/unit/test_fuzz_jobs.py compares it with one made the usual way)."""
    spec = _new_object(JobSpec)
    fields = spec.__dict__
    fields["key"] = key
    fields["kind"] = kind
    fields["payload"] = payload
    fields["metadata"] = metadata
    fields["tier"] = tier
    fields["task_id"] = None
    return spec


@dataclass(frozen=True)
class TaskRef:
    """What a job needs of the task version it names (pipeline.intake.tasks.lookup makes these)."""

    id: int
    name: str
    version: int
    kind: JobKind
    labels: list[str] | None
    schema: dict[str, Any] | None
    tier: str | None
    # The estimated tokens of what the task adds to every prompt of its jobs (its shared part).
    tokens: int = 0


# (name, version or None for the latest) -> the task version, or JobInputError if there is none.
TaskLookup = Callable[[str, int | None], TaskRef]


def digest(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def estimate_text_tokens(text: str) -> int:
    """A pessimistic token count for ``text``, without a tokenizer."""
    if text.isascii():
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    ascii_chars = len(text.encode("ascii", "ignore"))
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    return math.ceil(ascii_chars / CHARS_PER_TOKEN + other_bytes / NON_ASCII_BYTES_PER_TOKEN)


def _json_tokens(value: Any) -> int:
    return estimate_text_tokens(json.dumps(value, ensure_ascii=False))


def max_job_tokens(config: ModelConfig) -> int:
    """The largest job (estimated tokens) whose every prompt fits every tier's context window.

    A job's text is sent whole in each stage, and the context must also hold what comes with it:
    the prompts' scaffolding, the answer under check (the format check shows the work answer, up
    to work_max_tokens), the validator's feedback on a retry, and the tokens the call may write."""
    limits = config.limits
    per_stage = max(
        limits.triage_max_tokens,
        math.ceil(FEEDBACK_MAX_CHARS / CHARS_PER_TOKEN) + limits.work_max_tokens,
        limits.work_max_tokens + limits.format_check_max_tokens,
    )
    return min(t.context_tokens for t in config.tiers.values()) - PROMPT_SCAFFOLD_TOKENS - per_stage


@contextmanager
def json_limits() -> Iterator[None]:
    """Around the standard parser reading a user's JSON: refuse, as one JobInputError, the valid
    JSON it still cannot read. That is nesting deeper than it recurses (RecursionError), and an
    integer of more digits than Python converts (``sys.get_int_max_str_digits``, 4,300 by default:
    its guard against quadratic time), which the parser raises as a plain ValueError, not as a
    JSONDecodeError. A JSONDecodeError (not JSON at all) passes through, for the caller to word
    with its position. Every place JSON from a user is decoded goes through here."""
    try:
        yield
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise JobInputError("JSON is nested too deeply") from None
    except ValueError:
        raise JobInputError(f"a number has more than {sys.get_int_max_str_digits():,} digits, the most "
                            f"switchyard reads") from None


def decode_json(text: str | bytes) -> Any:
    """One JSON value from a user (a JSON Lines line, a request body), by the standard parser:
    anything it cannot read is a JobInputError of one sentence, without where (the caller's)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JobInputError(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        with json_limits():
            return json.loads(text)
    except json.JSONDecodeError as exc:
        # A line of JSON Lines is one line, whatever ends it; a request body may be many.
        at = f"line {exc.lineno} column {exc.colno}" if "\n" in text.rstrip() else f"column {exc.colno}"
        raise JobInputError(f"not valid JSON: {exc.msg} at {at}") from None


class _Inexact(Exception):
    """The job holds a number that orjson rounded: decode the line again with the standard parser."""


def _text(obj: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise JobInputError(f"missing required field {name!r}")
        return None
    if not isinstance(value, str):
        raise JobInputError(f"field {name!r} must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise JobInputError(f"field {name!r} must not be empty")
    if "\x00" in value:
        raise JobInputError(f"field {name!r} contains a NUL character")
    return value


def _check_string(text: str, name: str) -> None:
    if "\x00" in text:
        raise JobInputError(f"field {name!r} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JobInputError(f"field {name!r} contains an invalid Unicode character (a lone surrogate)") from None


def _check_strings(obj: dict[str, Any]) -> None:
    """Postgres stores no NUL character in text or JSONB, and UTF-8 has no lone surrogates (JSON's
    ``"\\ud800"``): refuse them anywhere in the job, keys included, naming the field, rather than
    fail at the insert. Walked without recursion, so a hostile depth cannot crash the check."""
    for name, value in obj.items():
        _check_string(name, name.encode("utf-8", "replace").decode().replace("\x00", "\\0"))
        stack: list[Any] = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                _check_string(item, name)
            elif isinstance(item, dict):
                # Reversed onto the stack: the first problem in reading order is the one named.
                for k, v in reversed(item.items()):
                    stack.append(v)
                    stack.append(k)
            elif isinstance(item, list):
                stack.extend(reversed(item))


def _check_storable(value: Any, name: str, *, exact: bool) -> None:
    """Refuse, with the field's name, what JSON cannot hold or what would recurse too deep: NaN
    and infinities, and nesting past MAX_DEPTH. Without ``exact`` (orjson decoded the line), a
    float too large to have been read exactly raises _Inexact. Walked without recursion."""
    if not isinstance(value, dict | list | float):
        return
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JobInputError(f"field {name!r} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, float):
            if not math.isfinite(item):
                raise JobInputError(f"field {name!r} contains {item}, which JSON cannot hold")
            if not exact and abs(item) >= _FLOAT_EXACT_BELOW:
                raise _Inexact
        elif isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _labels(obj: dict[str, Any]) -> tuple[list[str], int]:
    """The labels and their estimated tokens."""
    labels = obj.get("labels")
    if labels is None:
        raise JobInputError("a classify job needs 'labels', a list of the allowed labels")
    if not isinstance(labels, list) or not labels:
        raise JobInputError("field 'labels' must be a non-empty list of strings")
    if not all(isinstance(x, str) and x.strip() for x in labels):
        raise JobInputError("field 'labels' must contain only non-empty strings")
    if len(set(labels)) != len(labels):
        raise JobInputError("field 'labels' contains the same label twice")
    return labels, _labels_tokens(tuple(labels))


@functools.lru_cache(maxsize=1024)
def _labels_tokens(labels: tuple[str, ...]) -> int:
    # A file repeats its few label sets; serialising them for the estimate was a tenth of a parse.
    return _json_tokens(list(labels))


def _schema(obj: dict[str, Any], *, exact: bool, size: int, max_tokens: int | None) -> tuple[dict[str, Any], int]:
    """The schema and its estimated tokens. Without ``exact``, _check_storable has not walked it:
    its cached verdict says whether that walk would have passed. ``size``: the job's tokens
    besides the schema."""
    schema = obj.get("schema")
    if schema is None:
        raise JobInputError("an extract job needs 'schema', a JSON Schema object")
    if not isinstance(schema, dict):
        raise JobInputError(f"field 'schema' must be a JSON object, not {type(schema).__name__}")
    try:
        canonical = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        if not exact:  # nested deeper than orjson writes: let the standard path word the refusal
            raise _Inexact from None
        canonical = json.dumps(schema, sort_keys=True, ensure_ascii=False).encode()  # an integer past 64 bits
    # A byte of schema costs far more to check than to count, and a schema too large for the
    # context is refused anyway: refuse it first, so a huge one cannot hold a thread of the API.
    # Its UTF-8 length over CHARS_PER_TOKEN never exceeds its estimate, so nothing else is refused.
    if max_tokens is not None and size + len(canonical) / CHARS_PER_TOKEN > max_tokens:
        raise JobInputError(_too_large(size + _json_tokens(schema), max_tokens))
    problem, tokens, walked = _schema_verdict(canonical)
    if not exact and not walked:
        raise _Inexact
    if problem:
        raise JobInputError(problem)
    return schema, tokens


@functools.lru_cache(maxsize=1024)
def _schema_verdict(canonical: bytes) -> tuple[str | None, int, bool]:
    """Why a schema (as canonical JSON) cannot be used, or None; its estimated tokens;
    and whether it passes _check_storable as orjson read it. Cached: a file of extract jobs repeats
    a handful of schemas, and check_schema took two thirds of an enqueue (bench/enqueue.py), for a
    verdict that depends on the schema alone."""
    schema = json.loads(canonical)
    try:
        _check_storable(schema, "schema", exact=False)
    except JobInputError:
        return None, 0, False  # too deep: only orjson's reading gets here, and is read again
    except _Inexact:
        walked = False
    else:
        walked = True
    # A valid JSON Schema, whose references all resolve inside it and whose patterns RE2 can run.
    problem = schema_check.problem(schema)
    if problem:
        return f"field 'schema' {problem}", 0, walked
    return None, _json_tokens(schema), walked


def _metadata_bytes(metadata: dict[str, Any]) -> int:
    """The size the metadata limit is on: its UTF-8 JSON as json.dumps writes it."""
    return len(_encode_unicode(metadata).encode())


def _too_large(size: int, max_tokens: int) -> str:
    return f"job is too large for the model's context: about {size:,} tokens, limit {max_tokens:,}"


def parse_job(obj: Any, *, work_tiers: tuple[str, ...], max_tokens: int | None = None,
              tasks: TaskLookup | None = None) -> JobSpec:
    """Check one decoded job object and return it normalised. ``tasks`` finds the task a job names."""
    return _parse(obj, work_tiers, max_tokens, strings_checked=False, exact=True, tasks=tasks)


def _task_ref(obj: dict[str, Any], tasks: TaskLookup | None, max_tokens: int | None) -> TaskRef:
    """The task version a job names, and the fields it may not carry beside it checked."""
    name = obj["task"]
    if not isinstance(name, str) or not name.strip():
        raise JobInputError("field 'task' must be a task's name")
    version = obj.get("task_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise JobInputError(f"field 'task_version' must be a whole number from 1, not {quoted(version)}")
    if tasks is None:
        raise JobInputError("field 'task' cannot be used here: no task can be looked up")
    ref = tasks(name, version)
    kind = obj.get("kind")
    if kind is not None and kind != ref.kind:
        raise JobInputError(f"field 'kind' {quoted(kind)} does not fit task {quoted(ref.name)}, a "
                            f"{ref.kind.value} task: leave 'kind' out")
    for field in ("labels", "schema"):
        if field in obj:
            raise JobInputError(f"field {field!r} cannot be given with 'task': task {quoted(ref.name)} defines "
                                f"the job's {field}")
    if max_tokens is not None and ref.tokens >= max_tokens:
        raise JobInputError(f"task {quoted(ref.name)} is too large for the model's context: about "
                            f"{ref.tokens:,} tokens, limit {max_tokens:,}")
    return ref


def _parse(obj: Any, work_tiers: tuple[str, ...], max_tokens: int | None, *, strings_checked: bool,
           exact: bool, tasks: TaskLookup | None = None) -> JobSpec:
    """``strings_checked``: the decoder already refused lone surrogates and no string can hold a
    NUL. ``exact``: every number was read exactly (see _check_storable)."""
    if not isinstance(obj, dict):
        raise JobInputError(f"a job must be a JSON object, not {type(obj).__name__}")
    if not strings_checked:
        _check_strings(obj)
    # A job that names its task takes the kind, labels and schema of the task's version, bound now.
    ref = _task_ref(obj, tasks, max_tokens) if "task" in obj else None
    if ref is not None:
        kind = ref.kind
        allowed = _TASK_ALLOWED[kind]
    else:
        kind_raw = obj.get("kind")
        if kind_raw is None:
            raise JobInputError("missing required field 'kind' (classify, extract, draft or generate)")
        kind = _KINDS.get(kind_raw) if isinstance(kind_raw, str) else None  # type: ignore[assignment]
        if kind is None:
            raise JobInputError(f"unknown kind {quoted(kind_raw)}: expected classify, extract, draft or generate")
        allowed = _ALLOWED[kind]
    unknown = obj.keys() - allowed
    if unknown:
        ordered = sorted(unknown)
        shown = ", ".join(quoted(u, 40) for u in ordered[:5]) + (", ..." if len(ordered) > 5 else "")
        raise JobInputError(f"unknown field(s) {shown} for a {kind.value} job")
    if exact:
        for name, value in obj.items():
            _check_storable(value, name, exact=True)
    elif "metadata" in obj:
        # Every other field must be a string or a list of strings and is refused below if it is
        # not (and then decoded again, so the message is the standard one); the schema's walk is
        # cached with its verdict.
        _check_storable(obj["metadata"], "metadata", exact=False)

    required, optional = _FIELDS[kind]
    payload: dict[str, Any] = {}
    size = 0
    for name in required:
        text = _text(obj, name, required=True) or ""  # never empty: required
        payload[name] = text
        size += estimate_text_tokens(text)
    for name in optional:
        value = _text(obj, name, required=False)
        if value is not None:
            payload[name] = value
            size += estimate_text_tokens(value)
    if ref is not None:
        # The task's labels and schema go into the payload as if the job had carried them, so that
        # every stage that reads them (validation) works on a task's job unchanged. They were
        # checked when the task was applied; its shared part (ref.tokens) rides in every prompt.
        if ref.labels is not None:
            payload["labels"] = ref.labels
        if ref.schema is not None:
            payload["schema"] = ref.schema
        size += ref.tokens
    elif kind is JobKind.CLASSIFY:
        payload["labels"], tokens = _labels(obj)
        size += tokens
    elif kind is JobKind.EXTRACT:
        payload["schema"], tokens = _schema(obj, exact=exact, size=size, max_tokens=max_tokens)
        size += tokens

    tier = obj.get("tier")
    if tier is not None and tier not in work_tiers:
        raise JobInputError(f"unknown tier {quoted(tier)}: expected one of {', '.join(work_tiers)}")
    if tier is None and ref is not None:
        tier = ref.tier  # the task's pinned tier, unless the job pins its own
    task_id = ref.id if ref is not None else None

    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise JobInputError("field 'metadata' must be a JSON object")
    if metadata is not None and _metadata_bytes(metadata) > MAX_METADATA_BYTES:
        raise JobInputError(f"field 'metadata' is larger than {MAX_METADATA_BYTES:,} bytes")

    if max_tokens is not None and size > max_tokens:
        raise JobInputError(_too_large(size, max_tokens))

    key = obj.get("key")
    if key is None:
        key = _content_key(kind, payload, metadata, tier, task_id)
    elif not isinstance(key, str) or not key.strip():
        raise JobInputError("field 'key' must be a non-empty string")
    elif len(key) > MAX_KEY_LENGTH:
        raise JobInputError(f"field 'key' is longer than {MAX_KEY_LENGTH} characters")
    return JobSpec(key=key, kind=kind, payload=payload, metadata=metadata, tier=tier, task_id=task_id)


def _content_key(kind: JobKind, payload: dict[str, Any], metadata: dict[str, Any] | None, tier: str | None,
                 task_id: int | None) -> str:
    # No key: the content is the identity, so re-running the same file adds nothing.
    keyless = JobSpec(key="", kind=kind, payload=payload, metadata=metadata, tier=tier, task_id=task_id)
    return "sha256:" + keyless.content_digest()[:32]


@functools.lru_cache(maxsize=1024)
def _labels_verdict(labels: tuple[Any, ...]) -> int | None:
    """The estimated tokens of labels that _labels would accept, else None. Cached on the tuple:
    a tuple equal to one of strings holds those same strings, so a verdict is never borrowed
    by labels of another type."""
    if not all(isinstance(x, str) and x.strip() for x in labels) or len(set(labels)) != len(labels):
        return None
    return _labels_tokens(labels)


def _parse_plain(obj: Any, work_tiers: tuple[str, ...], max_tokens: int | None) -> JobSpec | None:
    """The common job, checked with as little work as its checks need: the same JobSpec _parse
    makes of it (orjson's reading, strings already checked, no task), or None for anything else,
    a bad job included, for _parse to decide and word. Most of an enqueue's Python time was the
    general path's per-line overhead (a walk of every field, helpers called by keyword, a set
    made to find unknown fields), which a file of well-formed jobs does not need.

    Every check of _parse is here, each only answering "fine" or "ask _parse", so no message is
    worded twice; tests/unit/test_fuzz_jobs.py holds the two to the same jobs."""
    if type(obj) is not dict:
        return None
    kind_raw = obj.get("kind")
    if type(kind_raw) is not str:
        return None
    kind = _KINDS.get(kind_raw)
    # A field the kind does not allow, "task" among them, is for _parse.
    if kind is None or not _ALLOWED[kind].issuperset(obj):
        return None
    metadata = obj.get("metadata")
    if metadata is not None:
        if type(metadata) is not dict:
            return None
        # Flat metadata of strings, integers (orjson's are exact), booleans and nulls, the usual
        # kind, holds nothing _check_storable refuses: only other metadata needs its walk.
        if not all(type(value) in _FLAT for value in metadata.values()):
            try:
                _check_storable(metadata, "metadata", exact=False)
            except (JobInputError, _Inexact):
                return None
    required, optional = _FIELDS[kind]
    payload: dict[str, Any] = {}
    size = 0
    for name in required:
        text = obj.get(name)
        if type(text) is not str or not text.strip():
            return None
        payload[name] = text
        size += estimate_text_tokens(text)
    for name in optional:
        text = obj.get(name)
        if text is not None:
            if type(text) is not str:
                return None
            payload[name] = text
            size += estimate_text_tokens(text)
    if kind is JobKind.CLASSIFY:
        labels = obj.get("labels")
        if type(labels) is not list or not labels:
            return None
        try:
            tokens = _labels_verdict(tuple(labels))
        except TypeError:  # a list or an object among them: unhashable, and not a label
            return None
        if tokens is None:
            return None
        payload["labels"] = labels
        size += tokens
    elif kind is JobKind.EXTRACT:
        try:
            payload["schema"], tokens = _schema(obj, exact=False, size=size, max_tokens=max_tokens)
        except (JobInputError, _Inexact):
            return None
        size += tokens
    tier = obj.get("tier")
    if tier is not None and (type(tier) is not str or tier not in work_tiers):
        return None
    if metadata is not None and _metadata_bytes(metadata) > MAX_METADATA_BYTES:
        return None
    if max_tokens is not None and size > max_tokens:
        return None
    key = obj.get("key")
    if key is None:
        key = _content_key(kind, payload, metadata, tier, None)
    elif type(key) is not str or not key.strip() or len(key) > MAX_KEY_LENGTH:
        return None
    return _plain_spec(key, kind, payload, metadata, tier)


def parse_line(line: str | bytes, *, work_tiers: tuple[str, ...], max_tokens: int | None = None,
               tasks: TaskLookup | None = None) -> JobSpec:
    """Decode and check one JSON Lines line (without the caller's line number)."""
    if isinstance(line, bytes):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            pass  # the standard parser below says what is wrong, in its words
        else:
            # orjson refuses lone surrogates and invalid UTF-8, so only the escape can make a NUL.
            strings_checked = b"\\u0000" not in line
            if strings_checked and (spec := _parse_plain(obj, work_tiers, max_tokens)) is not None:
                return spec
            try:
                return _parse(obj, work_tiers, max_tokens, strings_checked=strings_checked, exact=False,
                              tasks=tasks)
            except (JobInputError, _Inexact):
                pass  # decoded again below: the standard parser decides, and words the message
    return parse_job(decode_json(line), work_tiers=work_tiers, max_tokens=max_tokens, tasks=tasks)
