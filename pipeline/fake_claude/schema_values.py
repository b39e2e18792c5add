"""Making up a JSON value that validates against a JSON Schema (and one that does not).

Covers what extraction schemas use in practice: objects, arrays, enums/const, strings with common
formats and length bounds, bounded numbers, booleans, null, local $ref, allOf/anyOf/oneOf.
`pattern` is not solved; a pattern-constrained string gets the generic value.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema

from pipeline.fake_claude.prompt import pick, strip_hints, unit

_MAX_DEPTH = 12
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_PROPER_NAME = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
_PLACE = re.compile(r"\b(?:in|at|from|to|near)\s+([A-Z][a-z]+(?:\s+[A-Z][a-z]+)*)")
_PLACE_KEYS = ("city", "country", "location", "place", "town", "region", "destination", "origin")
_NAME_KEYS = ("name", "person", "author", "customer", "company", "organization", "organisation",
              "vendor", "sender", "recipient", "contact")
_PROSE_KEYS = ("summary", "description", "reason", "notes", "note", "text", "comment",
               "explanation", "message", "body", "title", "subject")


class SchemaFaker:
    def __init__(self, root: Any, text: str, digest: bytes) -> None:
        self._root = root
        self._text = strip_hints(text)
        self._digest = digest

    def value(self) -> Any:
        return self._value(self._root, "$", "", 0, 0)

    def wrong_value(self, good: Any, salt: str) -> Any | None:
        """A plausible wrong extraction: still valid against the schema, but one field of `good` holds
        another value (the field and the value chosen by the digest and `salt`). None when no field
        can take another valid value (consts, nulls, one-value enums, an empty object)."""
        leaves = sorted(self._leaves(self._root, good, "$", "", 0), key=lambda leaf: leaf[0])
        if not leaves:
            return None
        validator_class = jsonschema.validators.validator_for(self._root, default=jsonschema.Draft202012Validator)
        validator = validator_class(self._root, format_checker=validator_class.FORMAT_CHECKER)
        start = pick(self._digest, salt + "#field", len(leaves))
        for i in range(len(leaves)):
            path, steps, schema, key, depth = leaves[(start + i) % len(leaves)]
            current = _get(good, steps)
            for candidate in self._alternatives(schema, path, key, current, depth, salt):
                if candidate == current or not _same_kind(candidate, current):
                    continue
                changed = _replaced(good, steps, candidate)
                if validator.is_valid(changed):
                    return changed
        return None

    def _leaves(self, schema: Any, value: Any, path: str, key: str, depth: int
                ) -> Iterator[tuple[str, tuple[str | int, ...], Any, str, int]]:
        """(path, steps into the value, schema, key, depth) of each scalar in `value`, walking the
        schema as `_value` did to make it."""
        yield from self._walk(schema, value, path, (), key, depth)

    def _walk(self, schema: Any, value: Any, path: str, steps: tuple[str | int, ...], key: str, depth: int
              ) -> Iterator[tuple[str, tuple[str | int, ...], Any, str, int]]:
        resolved = self._resolve(schema, depth)
        if isinstance(resolved, dict) and depth <= _MAX_DEPTH and isinstance(value, (dict, list)):
            for keyword in ("oneOf", "anyOf"):
                options = resolved.get(keyword)
                if isinstance(options, list) and options:
                    chosen = next((o for o in options if not _only_null(self._resolve(o, depth))), options[0])
                    base = {k: v for k, v in resolved.items() if k != keyword}
                    resolved = _merge(base, self._resolve(chosen, depth + 1))
                    depth += 1
                    break
        if isinstance(value, dict) and isinstance(resolved, dict):
            raw_properties = resolved.get("properties")
            properties = raw_properties if isinstance(raw_properties, dict) else {}
            for name, item in value.items():
                sub = properties.get(name, resolved.get("additionalProperties", True))
                yield from self._walk(sub, item, f"{path}.{name}", (*steps, name), name, depth + 1)
        elif isinstance(value, list) and isinstance(resolved, dict):
            prefix = resolved.get("prefixItems")
            items = resolved.get("items", True)
            if isinstance(items, list):
                prefix, items = items, resolved.get("additionalItems", True)
            prefix = prefix if isinstance(prefix, list) else []
            for i, item in enumerate(value):
                sub = prefix[i] if i < len(prefix) else items
                yield from self._walk(sub, item, f"{path}[{i}]", (*steps, i), key.removesuffix("s"), depth + 1)
        elif not isinstance(value, (dict, list)):
            yield path, steps, schema, key, depth

    def _alternatives(self, schema: Any, path: str, key: str, current: Any, depth: int, salt: str
                      ) -> Iterator[Any]:
        """Other values for one field, the likeliest to be valid first."""
        if isinstance(current, bool):
            yield not current
        other = SchemaFaker(self._root, self._text, hashlib.sha256(self._digest + salt.encode()).digest())
        for variant in range(1, 6):
            yield self._value(schema, path, key, variant, depth)
            yield other._value(schema, path, key, variant - 1, depth)
        if isinstance(current, str):
            words = sorted({w.lower() for w in _WORD.findall(self._text)} - {current.lower()})
            start = pick(self._digest, salt + "#word", len(words)) if words else 0
            yield from (words[(start + i) % len(words)] for i in range(min(8, len(words))))
            yield from ("unknown", f"{current} (unconfirmed)", current[:-1] if len(current) > 1 else "x")

    # -- schema plumbing -------------------------------------------------------------------------

    def _resolve(self, schema: Any, depth: int) -> Any:
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < _MAX_DEPTH:
            target = self._pointer(schema["$ref"])
            if target is None:
                return {k: v for k, v in schema.items() if k != "$ref"}
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, dict) else target
            depth += 1
        if isinstance(schema, dict) and isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part, depth + 1)
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            schema = merged
        return schema

    def _pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node = self._root
        for token in [t for t in ref[1:].split("/") if t]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return None
        return node

    def _value(self, schema: Any, path: str, key: str, variant: int, depth: int) -> Any:
        schema = self._resolve(schema, depth)
        if schema is True or not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return self._string({}, path, key, variant)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self._enum(schema["enum"], path, variant)
        for keyword in ("oneOf", "anyOf"):
            options = schema.get(keyword)
            if isinstance(options, list) and options:
                # Prefer a non-null branch: null is valid but a poor extraction.
                chosen = next((o for o in options if not _only_null(self._resolve(o, depth))), options[0])
                base = {k: v for k, v in schema.items() if k != keyword}
                return self._value(_merge(base, self._resolve(chosen, depth + 1)), path, key, variant,
                                   depth + 1)
        kind = _type_of(schema)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, key, depth)
        if kind == "integer":
            return self._integer(schema, path, key, variant)
        if kind == "number":
            return self._number(schema, path, key, variant)
        if kind == "boolean":
            return unit(self._digest, path + "#bool") < 0.5 if variant == 0 else variant % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, path, key, variant)

    # -- one value per type ----------------------------------------------------------------------

    def _enum(self, values: list[Any], path: str, variant: int) -> Any:
        mentioned = [v for v in values if isinstance(v, str) and v
                     and re.search(rf"\b{re.escape(v)}\b", self._text, re.IGNORECASE)]
        if mentioned and variant == 0:
            return mentioned[0]
        return values[(pick(self._digest, path + "#enum", len(values)) + variant) % len(values)]

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        raw_properties = schema.get("properties")
        properties: dict[str, Any] = raw_properties if isinstance(raw_properties, dict) else {}
        raw_required = schema.get("required")
        required = [r for r in raw_required if isinstance(r, str)] if isinstance(raw_required, list) else []
        out: dict[str, Any] = {}
        for name in [*properties, *[r for r in required if r not in properties]]:
            sub = properties.get(name, schema.get("additionalProperties", True))
            if sub is False:
                continue
            out[name] = self._value(sub, f"{path}.{name}", name, 0, depth + 1)
        extra = schema.get("additionalProperties", True)
        minimum = schema.get("minProperties")
        while isinstance(minimum, int) and len(out) < minimum and extra is not False:
            name = f"field_{len(out) + 1}"
            out[name] = self._value(extra, f"{path}.{name}", name, 0, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], path: str, key: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft-04..2019 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix if isinstance(prefix, list) else []
        low = schema.get("minItems", 0) if isinstance(schema.get("minItems"), int) else 0
        high = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        count = max(low, len(prefix), 1 if items is not False else len(prefix))
        if items is not False and count < 2 and (high is None or high >= 2) and low == 0:
            count = 1 + pick(self._digest, path + "#len", 2)
        if high is not None:
            count = min(count, high)
        out: list[Any] = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            item_key = key.removesuffix("s")
            value = self._value(sub, f"{path}[{i}]", item_key, i, depth + 1)
            # Different variants give different values for most schemas; a few tries suffice.
            tries = 1
            while schema.get("uniqueItems") and value in out and tries < 32:
                value = self._value(sub, f"{path}[{i}]", item_key, i + tries, depth + 1)
                tries += 1
            out.append(value)
        return out

    def _bounds(self, schema: dict[str, Any], key: str, step: float) -> tuple[float, float]:
        """The interval to draw from: the schema's bounds, or a plausible range for the key."""
        lows = [schema["minimum"]] if _is_number(schema.get("minimum")) else []
        if _is_number(schema.get("exclusiveMinimum")):
            lows.append(schema["exclusiveMinimum"] + step)
        highs = [schema["maximum"]] if _is_number(schema.get("maximum")) else []
        if _is_number(schema.get("exclusiveMaximum")):
            highs.append(schema["exclusiveMaximum"] - step)
        default_low, default_high = _default_range(key)
        low = max(lows) if lows else None
        high = min(highs) if highs else None
        if low is None and high is None:
            return default_low, default_high
        if low is None:
            low = default_low if high is None or default_low <= high else high - 100
        if high is None:
            high = default_high if default_high >= low else low + 100
        return low, max(low, high)

    def _integer(self, schema: dict[str, Any], path: str, key: str, variant: int) -> int:
        low, high = self._bounds(schema, key, 1)
        low_i, high_i = math.ceil(low), math.floor(high)
        high_i = max(high_i, low_i)
        value = low_i + (pick(self._digest, path + "#int", high_i - low_i + 1) + variant) % (
            high_i - low_i + 1)
        multiple = schema.get("multipleOf")
        if isinstance(multiple, int) and multiple > 0:
            value = math.ceil(value / multiple) * multiple
            if value > high_i:
                value = math.floor(high_i / multiple) * multiple
        return value

    def _number(self, schema: dict[str, Any], path: str, key: str, variant: int) -> float | int:
        multiple = schema.get("multipleOf")
        if isinstance(multiple, (int, float)) and multiple > 0:
            low, high = self._bounds(schema, key, multiple)
            steps = max(0, math.floor((high - low) / multiple))
            n = math.ceil(low / multiple) + (pick(self._digest, path + "#num", steps + 1) + variant) % (
                steps + 1)
            return round(n * multiple, 10)
        low, high = self._bounds(schema, key, 0.01)
        value = round(low + (high - low) * unit(self._digest, f"{path}#num{variant}"), 2)
        return value if low <= value <= high else (low + high) / 2

    def _string(self, schema: dict[str, Any], path: str, key: str, variant: int) -> str:
        fmt = schema.get("format")
        value = self._formatted(fmt, path, variant) if isinstance(fmt, str) else None
        if value is None:
            value = self._plain(path, key.lower(), variant)
        raw_low, raw_high = schema.get("minLength"), schema.get("maxLength")
        low: int = raw_low if isinstance(raw_low, int) else 0
        high: int | None = raw_high if isinstance(raw_high, int) else None
        if len(value) < low:
            value = value.ljust(low, "x")
        if high is not None and len(value) > high:
            value = value[:high].rstrip() if high > 0 else ""
            value = value.ljust(min(low, high), "x")
        return value

    def _formatted(self, fmt: str, path: str, variant: int) -> str | None:
        u = unit(self._digest, f"{path}#fmt{variant}")
        if fmt in ("date", "date-time"):
            found = _ISO_DATE.search(self._text)
            date = found.group(0) if found and variant == 0 else (
                f"2025-{1 + int(u * 12):02d}-{1 + int(u * 1000) % 28:02d}")
            return date if fmt == "date" else f"{date}T{9 + int(u * 8):02d}:00:00Z"
        if fmt == "time":
            return f"{9 + int(u * 8):02d}:{int(u * 60) % 60:02d}:00"
        if fmt in ("email", "idn-email"):
            emails = _EMAIL.findall(self._text)
            if emails and variant < len(emails):
                return str(emails[variant])
            return f"{('alex', 'sam', 'jordan', 'casey')[int(u * 4)]}.{variant or 'morgan'}@example.com"
        if fmt in ("uri", "url", "iri", "uri-reference"):
            return f"https://example.com/{path.strip('$.').replace('.', '/') or 'item'}/{variant}"
        if fmt == "uuid":
            seed = hashlib.sha256(self._digest + f"{path}#{variant}".encode()).digest()
            return str(uuid.UUID(bytes=seed[:16], version=4))
        if fmt in ("hostname", "idn-hostname"):
            return "example.com"
        if fmt == "ipv4":
            return f"192.0.2.{1 + int(u * 250)}"
        if fmt == "ipv6":
            return f"2001:db8::{1 + int(u * 250):x}"
        return None

    def _plain(self, path: str, key: str, variant: int) -> str:
        text = " ".join(self._text.split())
        if any(k in key for k in _PLACE_KEYS):
            places = _PLACE.findall(text)
            if places:
                return str(places[variant % len(places)])
        elif any(k in key for k in _NAME_KEYS):
            names = _PROPER_NAME.findall(text)
            if names:
                return names[variant % len(names)]
        if any(k in key for k in _PROSE_KEYS) and text:
            sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
            return sentence[:160]
        words = _WORD.findall(text)
        if words:
            return words[(pick(self._digest, path + "#word", len(words)) + variant) % len(words)].lower()
        label = key.replace("_", " ").strip() or "value"
        return f"{label} {variant + 1}" if variant else label


def _get(value: Any, steps: tuple[str | int, ...]) -> Any:
    for step in steps:
        value = value[step]
    return value


def _same_kind(a: Any, b: Any) -> bool:
    """Both numbers, or both of one JSON type: a wrong value that changes type is not plausible."""
    if _is_number(a) and _is_number(b):
        return True
    return type(a) is type(b)


def _replaced(value: Any, steps: tuple[str | int, ...], new: Any) -> Any:
    if not steps:
        return new
    out = copy.deepcopy(value)
    node = out
    for step in steps[:-1]:
        node = node[step]
    node[steps[-1]] = new
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {**a, **b}
    if isinstance(a.get("properties"), dict) and isinstance(b.get("properties"), dict):
        merged["properties"] = {**a["properties"], **b["properties"]}
    if isinstance(a.get("required"), list) and isinstance(b.get("required"), list):
        merged["required"] = list(dict.fromkeys([*a["required"], *b["required"]]))
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _only_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [k for k in kind if k != "null"]
        kind = non_null[0] if non_null else "null"
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return "string"


def _default_range(key: str) -> tuple[float, float]:
    key = key.lower()
    if "year" in key:
        return 1990, 2026
    if "age" in key:
        return 18, 80
    if any(k in key for k in ("percent", "pct", "score")):
        return 0, 100
    if any(k in key for k in ("rating", "stars")):
        return 1, 5
    return 1, 100


def break_value(schema: Any, good: Any) -> Any | None:
    """A JSON value that fails the schema, or None when the schema accepts any JSON at all."""
    if not isinstance(schema, dict):
        return None
    kind = _type_of(schema) if "type" in schema or "properties" in schema else None
    required = schema.get("required")
    if isinstance(good, dict) and isinstance(required, list) and required:
        return {k: v for k, v in good.items() if k != required[0]}
    if kind == "object" or isinstance(good, dict):
        return ["[fake-bad-output]"]
    if kind is not None:
        return {"unexpected": "[fake-bad-output]"}
    if isinstance(schema.get("enum"), list):
        return "[fake-bad-output]" if "[fake-bad-output]" not in schema["enum"] else None
    return None
