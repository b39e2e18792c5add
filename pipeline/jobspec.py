"""What a job is, as the user writes it, and the checks that turn a line of input into one.

Every check raises ``JobInputError`` with one sentence naming the field and the problem; the
caller adds where (file and line). Nothing here touches the database.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from pipeline.config import ModelConfig
from pipeline.errors import JobInputError
from pipeline.models import JobKind

MAX_KEY_LENGTH = 200
# Characters per token for the size estimate at enqueue time. Deliberately pessimistic (real
# English runs ~4): a job rejected here would have failed at the API anyway.
CHARS_PER_TOKEN = 3.5
# Outside ASCII a character is often a token or more (CJK, emoji): such text is counted by its
# UTF-8 bytes instead, two bytes a token, so a page of Chinese is not taken for a quarter of its size.
NON_ASCII_BYTES_PER_TOKEN = 2.0
# The prompts' own text (system prompt, section tags) around the job; tests/unit/test_context_limit
# checks the real prompts stay under it.
PROMPT_SCAFFOLD_TOKENS = 600
# Validation feedback shown to a retried work call is cut to this (pipeline.prompts).
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
# Every field a job of some kind may have: the columns a CSV file may name.
JOB_FIELDS = frozenset(_COMMON | {f for req, opt in _FIELDS.values() for f in (*req, *opt)}
                       | {f for extra in _EXTRA.values() for f in extra})


@dataclass(frozen=True)
class JobSpec:
    key: str
    kind: JobKind
    payload: dict[str, Any]
    metadata: dict[str, Any] | None
    tier: str | None

    def content_digest(self) -> str:
        return digest({"kind": self.kind.value, "payload": self.payload, "tier": self.tier,
                       "metadata": self.metadata})


def digest(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def estimate_text_tokens(text: str) -> int:
    """A pessimistic token count for ``text``, without a tokenizer."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars
    return math.ceil(ascii_chars / CHARS_PER_TOKEN + other_bytes / NON_ASCII_BYTES_PER_TOKEN)


def estimate_tokens(payload: dict[str, Any]) -> int:
    return sum(estimate_text_tokens(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
               for v in payload.values())


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


def _short(value: Any, limit: int = 60) -> str:
    """A value quoted in an error message, cut so that a hostile one cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_string(text: str, name: str) -> None:
    if "\x00" in text:
        raise JobInputError(f"field {name!r} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JobInputError(f"field {name!r} contains invalid Unicode (an unpaired surrogate)") from None


def _check_storable(value: Any, name: str) -> None:
    """Refuse, with the field's name, what Postgres cannot store or what would recurse too deep:
    NUL characters and unpaired surrogates anywhere (keys included), NaN and infinities, and
    nesting past MAX_DEPTH. Walked without recursion, so a hostile depth cannot crash the check."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JobInputError(f"field {name!r} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            _check_string(item, name)
        elif isinstance(item, float) and not math.isfinite(item):
            raise JobInputError(f"field {name!r} contains {item}, which JSON cannot hold")
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_string(k, name)
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _labels(obj: dict[str, Any]) -> list[str]:
    labels = obj.get("labels")
    if labels is None:
        raise JobInputError("a classify job needs 'labels', a list of the allowed labels")
    if not isinstance(labels, list) or not labels:
        raise JobInputError("field 'labels' must be a non-empty list of strings")
    if not all(isinstance(x, str) and x.strip() for x in labels):
        raise JobInputError("field 'labels' must contain only non-empty strings")
    if len(set(labels)) != len(labels):
        raise JobInputError("field 'labels' contains the same label twice")
    return labels


def _schema(obj: dict[str, Any]) -> dict[str, Any]:
    schema = obj.get("schema")
    if schema is None:
        raise JobInputError("an extract job needs 'schema', a JSON Schema object")
    if not isinstance(schema, dict):
        raise JobInputError(f"field 'schema' must be a JSON object, not {type(schema).__name__}")
    problem = _schema_problem(json.dumps(schema, sort_keys=True))
    if problem:
        raise JobInputError(problem)
    return schema


@functools.lru_cache(maxsize=1024)
def _schema_problem(canonical: str) -> str | None:
    """Why a schema (as canonical JSON) is not a valid JSON Schema, or None. Cached: a file of
    extract jobs repeats a handful of schemas, and check_schema took two thirds of an enqueue
    (bench/enqueue.py), for a verdict that depends on the schema alone."""
    schema = json.loads(canonical)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"field 'schema' is not a valid JSON Schema at {path}: {exc.message}"
    return None


def _storable(value: Any, field: str) -> None:
    """Postgres stores no NUL character in text or JSONB, and UTF-8 has no lone surrogates (JSON's
    ``"\\ud800"``): refuse them here, naming the field, rather than fail at the insert."""
    if isinstance(value, str):
        if "\x00" in value:
            raise JobInputError(f"field {field!r} contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise JobInputError(f"field {field!r} contains an invalid Unicode character (a lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _storable(k, field)
            _storable(v, field)
    elif isinstance(value, list):
        for v in value:
            _storable(v, field)


def parse_job(obj: Any, *, work_tiers: tuple[str, ...], max_tokens: int | None = None) -> JobSpec:
    """Check one decoded job object and return it normalised."""
    if not isinstance(obj, dict):
        raise JobInputError(f"a job must be a JSON object, not {type(obj).__name__}")
    for name, value in obj.items():
        _storable(name, name.encode("utf-8", "replace").decode().replace("\x00", "\\0"))
        _storable(value, name)
    kind_raw = obj.get("kind")
    if kind_raw is None:
        raise JobInputError("missing required field 'kind' (classify, extract, draft or generate)")
    try:
        kind = JobKind(kind_raw) if isinstance(kind_raw, str) else None
    except ValueError:
        kind = None
    if kind is None:
        raise JobInputError(f"unknown kind {_short(kind_raw)}: expected classify, extract, draft or generate")

    required, optional = _FIELDS[kind]
    allowed = _COMMON | set(required) | set(optional) | _EXTRA.get(kind, set())
    unknown = sorted(set(obj) - allowed)
    if unknown:
        shown = ", ".join(_short(u, 40) for u in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise JobInputError(f"unknown field(s) {shown} for a {kind.value} job")
    for name in allowed & set(obj):
        _check_storable(obj[name], name)

    payload: dict[str, Any] = {}
    for name in required:
        payload[name] = _text(obj, name, required=True)
    for name in optional:
        value = _text(obj, name, required=False)
        if value is not None:
            payload[name] = value
    if kind is JobKind.CLASSIFY:
        payload["labels"] = _labels(obj)
    elif kind is JobKind.EXTRACT:
        payload["schema"] = _schema(obj)

    tier = obj.get("tier")
    if tier is not None and tier not in work_tiers:
        raise JobInputError(f"unknown tier {_short(tier)}: expected one of {', '.join(work_tiers)}")

    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise JobInputError("field 'metadata' must be a JSON object")
    if metadata is not None and len(json.dumps(metadata, ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
        raise JobInputError(f"field 'metadata' is larger than {MAX_METADATA_BYTES:,} bytes")

    if max_tokens is not None:
        size = estimate_tokens(payload)
        if size > max_tokens:
            raise JobInputError(
                f"job is too large for the model's context: about {size:,} tokens, limit {max_tokens:,}"
            )

    spec = JobSpec(key="", kind=kind, payload=payload, metadata=metadata, tier=tier)
    key = obj.get("key")
    if key is None:
        # No key: the content is the identity, so re-running the same file adds nothing.
        key = "sha256:" + spec.content_digest()[:32]
    elif not isinstance(key, str) or not key.strip():
        raise JobInputError("field 'key' must be a non-empty string")
    elif len(key) > MAX_KEY_LENGTH:
        raise JobInputError(f"field 'key' is longer than {MAX_KEY_LENGTH} characters")
    return JobSpec(key=key, kind=kind, payload=payload, metadata=metadata, tier=tier)


def parse_line(line: str | bytes, *, work_tiers: tuple[str, ...], max_tokens: int | None = None) -> JobSpec:
    """Decode and check one JSON Lines line (without the caller's line number)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JobInputError(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(line)
    except RecursionError:
        raise JobInputError("JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise JobInputError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    return parse_job(obj, work_tiers=work_tiers, max_tokens=max_tokens)
