"""Each validator, and pricing."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import load_config
from pipeline.flow.validation import check_label, check_schema, check_stop, deterministic_check, parse_format_check
from pipeline.models import JobKind

LABELS = ["billing", "bug", "other"]
SCHEMA = {"type": "object", "required": ["name", "total"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "total": {"type": "number", "minimum": 0}}}


@pytest.mark.parametrize("answer", ['{"label": "bug"}', "bug", '"bug"', '```json\n{"label": "bug"}\n```'])
def test_label_accepts_a_label_from_the_list(answer: str) -> None:
    v = check_label(answer, LABELS)
    assert v.ok and v.output == {"label": "bug"}


@pytest.mark.parametrize(("answer", "problem"), [
    ('{"label": "refund"}', "not one of"), ('{"label": "Bug"}', "not one of"),
    ('{"category": "bug"}', "is not {"), ("it is a bug\nI think", "is not {"), ("[1]", "is not {"),
])
def test_label_rejects_anything_else(answer: str, problem: str) -> None:
    v = check_label(answer, LABELS)
    assert not v.ok and problem in v.feedback


def test_schema_validator() -> None:
    ok = check_schema('{"name": "Dana", "total": 42.5}', SCHEMA)
    assert ok.ok and ok.output == {"name": "Dana", "total": 42.5}
    for answer, problem in [('{"name": "Dana"}', "'total' is a required property"),
                            ('{"name": "Dana", "total": -1}', "total: -1 is less than the minimum"),
                            ('{"name": "Dana", "total": 1, "x": 1}', "Additional properties"),
                            ("Here you go: name Dana", "not valid JSON"), ('{"name": ', "not valid JSON")]:
        v = check_schema(answer, SCHEMA)
        assert not v.ok and problem in v.feedback, v.problems


def test_stop_reasons_fail_every_kind() -> None:
    assert check_stop("text", "refusal") is not None and "refused" in check_stop("x", "refusal").feedback  # type: ignore[union-attr]
    assert "cut off" in check_stop('{"label": "b', "max_tokens").feedback  # type: ignore[union-attr]
    assert "empty" in check_stop("  ", "end_turn").feedback  # type: ignore[union-attr]
    assert check_stop("fine", "end_turn") is None


def test_drafts_need_a_format_check() -> None:
    assert deterministic_check(JobKind.DRAFT, {"instructions": "x"}, "Dear Dana") is None
    assert deterministic_check(JobKind.GENERATE, {"prompt": "x"}, "text") is None
    assert deterministic_check(JobKind.CLASSIFY, {"labels": LABELS}, "bug") is not None


def test_format_check_answers() -> None:
    assert parse_format_check('{"ok": true, "problems": []}', "Dear Dana").output == {"text": "Dear Dana"}
    bad = parse_format_check('{"ok": false, "problems": ["has a placeholder [NAME]"]}', "Dear [NAME]")
    assert not bad.ok and bad.problems == ["has a placeholder [NAME]"]
    assert not parse_format_check('{"ok": false}', "x").ok
    # An answer that is no verdict is None: the validate stage checks again, then fails closed.
    assert parse_format_check("I think it's fine", "Dear Dana") is None
    assert parse_format_check('{"ok": "yes"}', "Dear Dana") is None
    assert parse_format_check(None, "Dear Dana") is None
    # Problems that are not a list: one problem, or none, never a crash of the stage (nor a
    # problem for each character of a string).
    assert parse_format_check('{"ok": true, "problems": 5}', "x").ok
    assert parse_format_check('{"ok": false, "problems": "too short"}', "x").problems == ["too short"]
    for problems in ("5", "true", "1.5", '{"a": 1}'):
        verdict = parse_format_check('{"ok": false, "problems": ' + problems + "}", "x")
        assert not verdict.ok and verdict.problems == [problems], problems


def test_pricing_uses_configured_prices_and_cache_multipliers() -> None:
    config = load_config()
    sonnet = config.tier("sonnet")  # $2 / $10 per million in the defaults
    assert call_cost(sonnet, Usage(1_000_000, 0), config=config) == Decimal("2.00")
    assert call_cost(sonnet, Usage(0, 1_000_000), config=config) == Decimal("10.00")
    cost = call_cost(sonnet, Usage(1000, 500, cache_creation_input_tokens=2000, cache_read_input_tokens=4000),
                     config=config)
    assert cost == (Decimal(1000) * 2 + Decimal(2000) * 2 * Decimal("1.25") + Decimal(4000) * 2 * Decimal("0.10")
                    + Decimal(500) * 10) / 1_000_000
    assert Usage(10, 0, 5, 7).billed_input_tokens == 22


def test_tiers_price_in_the_documented_ratio() -> None:
    config = load_config()
    opus, sonnet, haiku = (config.tier(t) for t in ("opus", "sonnet", "haiku"))
    assert opus.output_per_mtok / sonnet.output_per_mtok == 2  # 5.5 generation: $20 vs $10
    assert sonnet.output_per_mtok / haiku.output_per_mtok == 20
