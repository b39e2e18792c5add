"""A job's JSON Schema, as the structured-outputs decoder takes it.

The decoder (``output_config.format``) compiles a subset of JSON Schema: typed values, primitive
enums and consts, ``anyOf``, local ``$ref`` to ``$defs``, objects closed with
``additionalProperties: false``, a few string formats, ``minItems`` of 0 or 1. Bounds it does not
enforce (numbers, string lengths, patterns, array sizes) are moved into the description, as the
anthropic SDK's own transform does, so the model still reads them. The answer is then checked
against the job's original schema (pipeline/flow/validation.py), so what the decoder loosens costs
a retry at worst, never a wrong answer accepted.

A schema the decoder cannot express usefully gets None: the call goes without structured outputs,
and the answer is checked as before. That is a schema left open somewhere (a value of any type, an
object of any keys, a map), a recursive one, one whose references leave its own ``$defs``, or one
built on keywords that change a value's shape (``prefixItems``, ``patternProperties``). Closing
such a schema would forbid answers the job's schema wants; sending it would fail the call.

The result is a pure function of the schema, built in a fixed key order: every job of a task
version sends the same bytes, which the prompt cache needs (a change of output format invalidates it).
"""

from __future__ import annotations

import json
from typing import Any

# The string formats the decoder knows (the SDK's list); any other format is a description.
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"})
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# Annotations the decoder has no use for; dropped without a word.
_DROPPED = frozenset({"$schema", "$comment", "$anchor", "$dynamicAnchor", "examples", "default", "deprecated",
                      "readOnly", "writeOnly", "contentMediaType", "contentEncoding"})
# Keywords that change which values have a shape at all: a closed object or a uniform array would
# forbid what they allow.
_SHAPES = frozenset({"patternProperties", "prefixItems", "additionalItems", "$dynamicRef", "$recursiveRef",
                     "$recursiveAnchor", "unevaluatedItems"})
_DEFS = ("$defs", "definitions")
# Subschemas made at most. anyOf beside other keywords is rewritten into its branches, each with a
# copy of those keywords, so a schema nesting that can double the work at each level; a tenant's
# schema must not hold a worker for it. The API bounds a schema's complexity far below this anyway.
MAX_NODES = 10_000
# A keyword's list value longer than this is not written into a description.
_LISTED = 20
# Keywords that apply to values of one type only, to split a list of types into a branch each.
_NUMERIC = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_OWN = {
    "object": frozenset({"properties", "required", "additionalProperties", "unevaluatedProperties", "minProperties",
                         "maxProperties", "propertyNames", "dependentRequired", "dependentSchemas"}),
    "array": frozenset({"items", "minItems", "maxItems", "uniqueItems", "contains", "minContains", "maxContains"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": _NUMERIC,
    "integer": _NUMERIC,
}


class _Inexpressible(Exception):
    """The schema has a part the decoder cannot hold (the module docstring says which)."""


def for_decoder(schema: Any) -> dict[str, Any] | None:
    """The schema to send as ``output_config.format.schema``, or None to send none."""
    if not isinstance(schema, dict):
        return None
    try:
        return _Transform(schema).root()
    except (_Inexpressible, RecursionError):
        return None


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


class _Transform:
    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._nodes = 0
        self._defs: dict[str, tuple[str, str, Any]] = {}  # "#/$defs/name" -> (container, name, schema)
        for container in _DEFS:
            defs = root.get(container)
            if defs is None:
                continue
            if not isinstance(defs, dict):
                raise _Inexpressible
            for name, sub in defs.items():
                self._defs[f"#/{container}/{name}"] = (container, name, sub)

    def root(self) -> dict[str, Any]:
        self._refuse_cycles()
        body = {k: v for k, v in self._root.items() if k not in (*_DEFS, "$id")}
        top = self._node(body)
        if top.get("type") != "object":
            raise _Inexpressible(body)  # the answer is asked for as one JSON object
        out: dict[str, Any] = {}
        for container in _DEFS:
            defs = {name: self._node(sub) for c, name, sub in self._defs.values() if c == container}
            if defs:
                out[container] = defs
        return {**top, **out}

    def _refuse_cycles(self) -> None:
        """A recursive schema (a definition that reaches itself) is beyond the decoder."""
        edges = {ref: _refs(sub) for ref, (_, _, sub) in self._defs.items()}
        done: set[str] = set()

        def visit(ref: str, path: tuple[str, ...]) -> None:
            if ref in path:
                raise _Inexpressible(ref)
            if ref in done:
                return
            if ref not in edges:
                raise _Inexpressible(ref)  # a reference to no definition
            for nxt in edges[ref]:
                visit(nxt, (*path, ref))
            done.add(ref)

        for ref in edges:
            visit(ref, ())

    def _node(self, schema: Any) -> dict[str, Any]:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Inexpressible("too large")
        if not isinstance(schema, dict):
            raise _Inexpressible(schema)  # true, false: any value, or none
        rest = {k: v for k, v in schema.items() if k not in _DROPPED}
        if rest.keys() & _SHAPES or "$id" in rest or rest.keys() & set(_DEFS):
            raise _Inexpressible(schema)
        out: dict[str, Any] = {}
        ref = rest.pop("$ref", None)
        if ref is not None:
            if not isinstance(ref, str) or ref not in self._defs:
                raise _Inexpressible(ref)
            out["$ref"] = ref
            # Keywords beside a reference narrow it; left to validation.
            return _described(out, rest)

        kind = rest.pop("type", None)
        literal = False
        if "enum" in rest:
            enum = rest.pop("enum")
            if not isinstance(enum, list) or not enum or not all(_primitive(v) for v in enum):
                raise _Inexpressible(enum)
            out["enum"], literal = enum, True
        if "const" in rest:
            const = rest.pop("const")
            if not _primitive(const):
                raise _Inexpressible(const)
            out["const"], literal = const, True
        variants = rest.pop("anyOf", None) or rest.pop("oneOf", None)  # oneOf: exclusive, left to validation
        rest.pop("oneOf", None)
        if variants is not None:
            if not isinstance(variants, list) or not variants:
                raise _Inexpressible(variants)
            if literal or kind is not None:
                # Siblings of anyOf apply to every branch.
                base = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                variants = [{**base, **v} if isinstance(v, dict) else v for v in variants]
                return self._node({"anyOf": variants})
            out["anyOf"] = [self._node(v) for v in variants]
            return _described(out, rest, keep_annotations=True)
        if "allOf" in rest:
            parts = rest.pop("allOf")
            # One part is that part; several would each be closed to the others' properties.
            if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict):
                raise _Inexpressible(parts)
            return self._node({**rest, **({"type": kind} if kind is not None else {}), **out, **parts[0]})
        if literal:
            return _described(out, rest, keep_annotations=True)
        if isinstance(kind, list):
            if not kind or not all(k in _TYPES for k in kind):
                raise _Inexpressible(kind)
            if len(kind) > 1:
                return self._node({"anyOf": [_branch(rest, k) for k in kind]})
            kind = kind[0]
        if kind is None and ("properties" in rest or "required" in rest):
            kind = "object"
        if kind not in _TYPES:
            raise _Inexpressible(kind)  # no type: any value at all
        out["type"] = kind
        if kind == "object":
            self._object(rest, out)
        elif kind == "array":
            self._array(rest, out)
        elif kind == "string":
            fmt = rest.get("format")
            if isinstance(fmt, str) and fmt in FORMATS:
                out["format"] = rest.pop("format")
        return _described(out, rest, keep_annotations=True)

    def _object(self, rest: dict[str, Any], out: dict[str, Any]) -> None:
        properties = rest.pop("properties", {})
        required = rest.pop("required", [])
        extra = rest.pop("additionalProperties", True)
        rest.pop("unevaluatedProperties", None)  # the closed object forbids what it would
        if not isinstance(properties, dict) or not isinstance(required, list) or \
                not all(isinstance(name, str) for name in required):
            raise _Inexpressible(properties)
        if extra is not False and (not isinstance(extra, bool) or not properties):
            raise _Inexpressible(extra)  # a map, or an object of any keys: closing it would empty it
        if any(name not in properties for name in required):
            raise _Inexpressible(required)  # required, but closed out
        out["properties"] = {name: self._node(sub) for name, sub in properties.items()}
        if required:
            out["required"] = required
        out["additionalProperties"] = False

    def _array(self, rest: dict[str, Any], out: dict[str, Any]) -> None:
        if "items" not in rest:
            raise _Inexpressible(rest)  # items of any type
        out["items"] = self._node(rest.pop("items"))
        low = rest.get("minItems")
        if low in (0, 1) and not isinstance(low, bool):
            out["minItems"] = rest.pop("minItems")


def _branch(rest: dict[str, Any], kind: str) -> dict[str, Any]:
    """One type of a list of types, with the keywords of the others left out."""
    others = frozenset().union(*(own for k, own in _OWN.items() if k != kind)) - _OWN.get(kind, frozenset())
    return {**{k: v for k, v in rest.items() if k not in others}, "type": kind}


def _described(out: dict[str, Any], rest: dict[str, Any], *, keep_annotations: bool = False) -> dict[str, Any]:
    """``out`` with the title and description kept, and what the decoder leaves unenforced written
    into the description, so the model reads it: the bounds, formats and patterns (a keyword whose
    value is a subschema, such as ``not``, is left to validation: each branch of an anyOf would
    copy it, however large)."""
    title, description = rest.pop("title", None), rest.pop("description", None)
    if keep_annotations and isinstance(title, str):
        out["title"] = title
    notes = [description] if isinstance(description, str) and description else []
    said = {k: v for k, v in rest.items() if _primitive(v) or (
        isinstance(v, list) and len(v) <= _LISTED and all(_primitive(x) for x in v))}
    if said:
        notes.append(json.dumps(said, ensure_ascii=False, sort_keys=True, separators=(", ", ": ")))
    if notes:
        out["description"] = "\n\n".join(notes)
    return out


def _refs(schema: Any) -> set[str]:
    """Every $ref under ``schema``."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                found.add(ref)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found
