"""A tenant's JSON Schema, run with no I/O and in bounded time.

An extract job carries a JSON Schema written by whoever submitted it, and the validate worker runs
it against a model's answer. Three things keep that schema from reaching anything or holding a
worker:

- **References resolve only inside the schema** (and the JSON Schema meta-schemas that ship with
  jsonschema). The registry's ``retrieve`` refuses every URI, so no ``$ref``, ``$dynamicRef``,
  ``$recursiveRef`` or reference relative to an ``$id`` can read a file or send a request,
  whatever it names: the only I/O path in the resolver is that function.
- **Patterns run on RE2**, whose matching time is linear in the text: no pattern backtracks. That
  covers ``pattern``, ``patternProperties``, and through them ``additionalProperties``,
  ``unevaluatedProperties`` and ``propertyNames``. A pattern RE2 cannot compile (backreferences,
  lookaround) is refused.
- **A check has a CPU budget.** Each level of nested ``anyOf``/``oneOf``/``allOf`` behind a
  ``$ref`` can double the checks an answer takes; the budget stops a schema built that way.
  (Without references a schema is a tree, and its check is bounded by its size times the answer's.)

``problem`` is the check at submission. ``errors`` is the check at validation; it raises
``SchemaUnusable`` (never anything else of the schema's making) for a schema submitted before
these checks existed, or one whose cost only shows against an answer.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from fractions import Fraction
from typing import Any

import attrs
import jsonschema
import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import re2
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as META_SCHEMAS

# CPU seconds one answer's check may take. An honest schema takes milliseconds; one whose checks
# double with each level of nesting takes hours, and is stopped here instead.
CPU_BUDGET_S = 2.0
# RE2 refuses a pattern whose compiled form would need more than this: it bounds the memory of
# each pattern in the cache below, and no pattern an extraction needs comes near it.
_RE2_MAX_MEM = 1 << 20

_NOT_FOLLOWED = "switchyard follows no reference to a file, a URL or another document"
_RE2_LACKS = "patterns run on RE2, which has no backreferences or lookaround"


class SchemaUnusable(Exception):
    """The schema cannot be checked against an answer. ``reason`` is a clause whose subject is the
    schema ("has a reference ... that does not resolve inside the schema ...")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _short(value: Any, limit: int = 200) -> str:
    """A reference or pattern quoted in a message, cut so that a hostile one cannot flood it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _at(path: str | None) -> str:
    return f" at {path}" if path else ""


def _unresolved(ref: str, path: str | None = None) -> str:
    return f"has a reference {_short(ref)}{_at(path)} that does not resolve inside the schema: {_NOT_FOLLOWED}"


def _unrunnable(pattern: str, error: Exception, path: str | None = None) -> str:
    why = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) else str(error)
    return f"has a pattern {_short(pattern)}{_at(path)} that switchyard cannot run ({why}): {_RE2_LACKS}"


# -- references ----------------------------------------------------------------------------------


def _refuse(uri: str) -> referencing.Resource[Any]:
    """The registry's retrieval, asked for every URI the schema does not contain: never fetched."""
    # (an attrs class deriving from KeyError: mypy sees KeyError's constructor)
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


# (attrs spells the field _retrieve; mypy does not see its alias)
CONFINED: referencing.Registry[Any] = referencing.Registry(retrieve=_refuse)  # type: ignore[call-arg]


def _specification(draft: type[Validator]) -> referencing.Specification[Any]:
    return referencing.jsonschema.specification_with(
        draft.ID_OF(draft.META_SCHEMA) or "urn:unknown-dialect", default=referencing.Specification.OPAQUE)


def _own(schema: dict[str, Any], draft: type[Validator]) -> tuple[referencing.Resource[Any], referencing.Registry[Any]]:
    """The schema as a resource, and CONFINED holding it with every subschema's $id and anchor
    found once. Left uncrawled, the resolver crawls the whole schema again at each reference to an
    $id or an anchor, which made a schema of a few thousand of them take minutes."""
    root = _specification(draft).create_resource(schema)
    return root, CONFINED.with_resource(root.id() or "", root).crawl()


# -- patterns ------------------------------------------------------------------------------------

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is reported to its author, not to the worker's stderr
_OPTIONS.max_mem = _RE2_MAX_MEM
# ECMA-262 (the syntax JSON Schema patterns use) writes a code point \uXXXX; RE2 writes \x{XXXX}.
# An escaped backslash is matched first, so "\\u0041" stays a backslash followed by "u0041".
_ECMA_CODE_POINT = re.compile(r"\\(\\|u([0-9A-Fa-f]{4}))")


def _to_re2(match: re.Match[str]) -> str:
    return rf"\x{{{match.group(2)}}}" if match.group(2) else match.group(0)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Any:
    """A JSON Schema pattern compiled by RE2; raises ``re2.error`` for one RE2 cannot run.
    Cached: an answer's check matches the same few patterns against every string it holds."""
    return re2.compile(_ECMA_CODE_POINT.sub(_to_re2, pattern), _OPTIONS)


class _Re2:
    """Stands in for ``re`` in jsonschema's keyword modules, which call only ``re.search``.

    jsonschema has no hook for its regex engine, and four keywords match patterns through those
    modules (``pattern``, ``patternProperties``, and the property lists behind
    ``additionalProperties`` and ``unevaluatedProperties``); overriding the keywords would mean
    copying their evaluation logic. So the modules get this object as their ``re``.
    tests/unit/test_schema_confinement.py runs a catastrophic pattern through each keyword."""

    error = re2.error

    @staticmethod
    def search(pattern: str, string: str) -> Any:
        try:
            compiled = compile_pattern(pattern)
        except re2.error as exc:  # stored before patterns were checked at submission
            raise SchemaUnusable(_unrunnable(pattern, exc)) from None
        return compiled.search(string)


for _module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
    if not hasattr(_module, "re"):
        raise RuntimeError(f"{_module.__name__} no longer matches patterns with re.search: "
                           f"pipeline/flow/schema_check.py must be updated for this jsonschema")
    _module.re = _Re2  # type: ignore[attr-defined]


# -- CPU -----------------------------------------------------------------------------------------


class _Budget:
    """The thread CPU time a check must end by, read every few evolves (the clock is a syscall)."""

    __slots__ = ("deadline", "steps")

    def __init__(self, seconds: float) -> None:
        self.deadline = time.thread_time() + seconds
        self.steps = 0

    def spend(self) -> None:
        self.steps += 1
        if self.steps % 16 == 0 and time.thread_time() > self.deadline:
            raise SchemaUnusable(f"is too costly to check: checking one answer took over {CPU_BUDGET_S:g} s of "
                                 f"CPU (nested anyOf, oneOf or allOf behind references?)")


_budget: ContextVar[_Budget | None] = ContextVar("schema_check_budget", default=None)
# Built once per draft and never changed after; a race builds one twice, harmlessly.
_CONFINED_CLASS: dict[type[Validator], type[Validator]] = {}
_PLAIN: dict[type[Validator], type[Validator]] = {}
_FIELDS: dict[type[Validator], list[tuple[str, str]]] = {}


def _multiple_of(validator: Validator, dB: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    """jsonschema's ``multipleOf``, which divides in floating point first: a number past a double's
    range (an integer of 309 digits or more, which a job can ask a model to write) overflows it
    outside jsonschema's own guard. The check is then made exactly, on the numbers as JSON wrote
    them (a float's shortest decimal form, so 0.1 is 1/10)."""
    try:
        yield from jsonschema._keywords.multipleOf(validator, dB, instance, schema)
    except OverflowError:
        if (_exact(instance) / _exact(dB)).denominator != 1:
            yield ValidationError(f"{instance!r} is not a multiple of {dB}")


def _exact(number: int | float) -> Fraction:
    return Fraction(repr(number)) if isinstance(number, float) else Fraction(number)


def _confined(draft: type[Validator]) -> type[Validator]:
    """``draft`` with an ``evolve`` that keeps to the CPU budget: a validator evolves once for each
    subschema it checks, so an explosion of checks passes through here often. Its ``multipleOf``
    (draft 3's ``divisibleBy``) takes numbers of any size."""
    confined = _CONFINED_CLASS.get(draft)
    if confined is None:
        overrides = {name: _multiple_of for name, check in draft.VALIDATORS.items()
                     if check is jsonschema._keywords.multipleOf}
        confined = jsonschema.validators.extend(draft, validators=overrides)
        confined.evolve = _evolve  # type: ignore[method-assign]
        _PLAIN[confined] = draft
        _FIELDS[confined] = [(f.name, f.alias) for f in attrs.fields(confined) if f.init]  # type: ignore[arg-type]
        _CONFINED_CLASS[draft] = confined  # last: another thread may read it at once
    return confined


def _evolve(self: Validator, **changes: Any) -> Validator:
    """jsonschema's own ``evolve``, but with a deadline, and keeping a subschema that names its
    own ``$schema`` confined: jsonschema would hand it to the plain class of that draft."""
    budget = _budget.get()
    if budget is not None:
        budget.spend()
    schema = changes.setdefault("schema", self.schema)
    cls = _confined(jsonschema.validators.validator_for(schema, default=_PLAIN[type(self)]))
    for name, alias in _FIELDS[type(self)]:
        if alias not in changes:
            changes[alias] = getattr(self, name)
    return cls(**changes)


def _draft(schema: dict[str, Any]) -> type[Validator]:
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)  # type: ignore[no-any-return]


def errors(schema: dict[str, Any], instance: Any) -> list[ValidationError]:
    """Every way ``instance`` fails ``schema``. Raises SchemaUnusable when the schema cannot be
    checked: a reference outside it, a pattern RE2 cannot run, a loop, or too much CPU."""
    draft = _draft(schema)
    _, registry = _own(schema, draft)
    # jsonschema adds its bundled meta-schemas to the registry, and the schema itself (again).
    validator = _confined(draft)(schema, registry=registry)  # type: ignore[call-arg]
    token = _budget.set(_Budget(CPU_BUDGET_S))
    try:
        return list(validator.iter_errors(instance))
    except referencing.exceptions.Unresolvable as exc:
        # Named as written, as far as the error tells: a pointer comes without its '#', a missing
        # anchor as the resource it was looked for in plus the anchor.
        ref, anchor = str(exc.ref), getattr(exc, "anchor", None)
        if anchor is not None:
            ref = f"{ref}#{anchor}"
        elif ref.startswith("/"):
            ref = "#" + ref
        raise SchemaUnusable(_unresolved(ref)) from None
    except RecursionError:
        raise SchemaUnusable("refers to itself without end: checking the answer recursed too deeply") from None
    finally:
        _budget.reset(token)


# -- at submission -------------------------------------------------------------------------------


_META_FORMATS: dict[type[Validator], jsonschema.FormatChecker] = {}


def _meta_formats(draft: type[Validator]) -> jsonschema.FormatChecker:
    """The meta-schema's format checks, but for "regex": Python's re would judge patterns that RE2
    runs, so ``_walk`` judges them with RE2 instead."""
    formats = _META_FORMATS.get(draft)
    if formats is None:
        formats = jsonschema.FormatChecker(formats=())
        formats.checkers = {name: check for name, check in draft.FORMAT_CHECKER.checkers.items() if name != "regex"}
        _META_FORMATS[draft] = formats
    return formats


def _paths(schema: Any) -> dict[int, str]:
    """Where each object and array of the schema sits, as a slash-separated path, by identity."""
    paths: dict[int, str] = {}
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        paths[id(node)] = path
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, dict | list):
                stack.append((value, f"{path}/{key}" if path else str(key)))
    return paths


def _walk(schema: dict[str, Any], draft: type[Validator]) -> Iterator[str]:
    """Every reference that does not resolve inside the schema and every pattern RE2 cannot run,
    in reading order. Subschemas are found the way the resolver finds them (by each draft's
    keywords), so a "$ref" inside an ``enum`` value, which is data, is not taken for one."""
    root, registry = _own(schema, draft)
    paths = _paths(schema)
    # What a validator resolves against: the schema and the meta-schemas jsonschema bundles.
    stack = [(root, META_SCHEMAS.combine(registry).resolver(base_uri=root.id() or ""))]
    while stack:
        resource, resolver = stack.pop()
        resolver = resolver.in_subresource(resource)
        contents = resource.contents
        if not isinstance(contents, dict):
            continue
        path = paths.get(id(contents), "")
        for keyword in ("$ref", "$dynamicRef", "$recursiveRef"):
            ref = contents.get(keyword)
            if isinstance(ref, str):
                try:
                    resolver.lookup(ref)
                except referencing.exceptions.Unresolvable:
                    yield _unresolved(ref, f"{path}/{keyword}" if path else keyword)
        patterns = [(contents["pattern"], "pattern")] if isinstance(contents.get("pattern"), str) else []
        if isinstance(contents.get("patternProperties"), dict):
            patterns += [(p, "patternProperties") for p in contents["patternProperties"]]
        for pattern, keyword in patterns:
            try:
                compile_pattern(pattern)
            except re2.error as exc:
                yield _unrunnable(pattern, exc, f"{path}/{keyword}" if path else keyword)
        stack.extend((sub, resolver) for sub in reversed(list(resource.subresources())))


def problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` cannot be an extract job's schema, as a clause whose subject is the schema
    ("is not a valid JSON Schema at ...", "has a reference ..."), or None."""
    draft = _draft(schema)
    try:
        draft.check_schema(schema, format_checker=_meta_formats(draft))
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"is not a valid JSON Schema at {path}: {exc.message}"
    return next(_walk(schema, draft), None)
