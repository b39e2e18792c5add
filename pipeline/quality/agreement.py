"""Whether a routed answer agrees with the reference tier's, per kind.

- classify: the same label.
- extract: field by field, after normalising each value (whitespace and case of strings, number
  formats: ``"1,240.50"``, ``1240.5`` and ``"1240.50"`` are one number), with the share of fields equal.
- draft and generate: no rule can tell; a judge model answers whether the routed answer is as good
  as the reference for the instructions (``parse_judge``).

``Agreement.agreed`` is the yes/no the estimators count: every field equal, for extract.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any


@dataclass(frozen=True)
class Agreement:
    score: float  # 1 or 0; for extract, the share of fields equal
    agreed: bool
    fields_total: int | None = None
    fields_equal: int | None = None
    reason: str | None = None


_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?")
# Thousands grouped by commas, as invoices write them: 1,240.50
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def _number(text: str) -> Decimal | None:
    if _GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    elif not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def normalise(value: Any) -> Any:
    """A value as compared: strings with runs of whitespace made one space, trimmed and casefolded;
    numbers, and strings that read as one, as exact decimals (so 42.5 == "42.50"); objects and
    lists normalised throughout. Booleans are kept apart from numbers: in Python True == 1, but a
    field that says true is not one that says 1."""
    if isinstance(value, bool):
        return ("bool", value)
    if value is None:
        return value
    if isinstance(value, int | float):
        return Decimal(str(value))
    if isinstance(value, str):
        text = " ".join(value.split()).casefold()
        number = _number(text)
        return number if number is not None else text
    if isinstance(value, dict):
        return {str(k): normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def same_label(routed: Any, reference: Any) -> Agreement:
    """Two classify outputs ({"label": ...}): agreed when the labels are the same."""
    a = routed.get("label") if isinstance(routed, dict) else routed
    b = reference.get("label") if isinstance(reference, dict) else reference
    agreed = a == b
    return Agreement(1.0 if agreed else 0.0, agreed)


def same_fields(routed: Any, reference: Any) -> Agreement:
    """Two extract outputs, field by field (the top-level keys of either; a field one of them
    leaves out counts as null). Values that are not both objects count as one field."""
    if not isinstance(routed, dict) or not isinstance(reference, dict):
        agreed = normalise(routed) == normalise(reference)
        return Agreement(1.0 if agreed else 0.0, agreed, 1, int(agreed))
    keys = sorted(routed.keys() | reference.keys())
    equal = sum(1 for k in keys if normalise(routed.get(k)) == normalise(reference.get(k)))
    if not keys:
        return Agreement(1.0, True, 0, 0)
    return Agreement(equal / len(keys), equal == len(keys), len(keys), equal)


def parse_judge(text: str | None) -> Agreement | None:
    """The judge's answer, {"as_good": true|false, "reason": "..."}; None when it is no verdict."""
    from pipeline.flow.validation import _load_json

    data = _load_json(text or "")
    if not isinstance(data, dict) or not isinstance(data.get("as_good"), bool):
        return None
    reason = data.get("reason")
    agreed = bool(data["as_good"])
    return Agreement(1.0 if agreed else 0.0, agreed, reason=str(reason)[:2000] if reason is not None else None)


def as_text(output: Any) -> str:
    """A draft's or generation's stored output ({"text": ...}) as the answer it was."""
    if isinstance(output, dict) and isinstance(output.get("text"), str):
        return output["text"]
    return output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
