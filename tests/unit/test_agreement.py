"""Agreement of a routed answer with the reference's: labels, extracted fields, the judge."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.quality.agreement import normalise, parse_judge, same_fields, same_label


@pytest.mark.parametrize(("a", "b"), [
    ("  Dana   Smith\n", "dana smith"),
    ("1,240.50", 1240.5),
    ("1240.50", "1240.5"),
    (42, 42.0),
    ("-3", -3),
    ({"x": " A "}, {"x": "a"}),
    ([1, "B"], ["1.0", "b"]),
])
def test_normalise_sets_whitespace_case_and_number_formats_aside(a: object, b: object) -> None:
    assert normalise(a) == normalise(b)


@pytest.mark.parametrize(("a", "b"), [
    ("1,24.5", 124.5),  # not a grouping of thousands: stays text
    (True, 1),  # a boolean is not a number here
    ("dana smith", "dana smyth"),
    (None, ""),
    ([1, 2], [2, 1]),
])
def test_normalise_keeps_what_differs_apart(a: object, b: object) -> None:
    assert normalise(a) != normalise(b)


def test_normalised_numbers_are_exact_decimals() -> None:
    assert normalise("1,240.50") == Decimal("1240.5")
    assert normalise(0.1) == Decimal("0.1")


def test_fields_are_compared_one_by_one_with_the_share_equal() -> None:
    routed = {"name": "Dana  Smith", "amount": "42.50", "paid": True, "note": None}
    reference = {"name": "dana smith", "amount": 42.5, "paid": False}
    a = same_fields(routed, reference)
    # name and amount equal once normalised; paid differs; note is null on one side, absent on the other
    assert (a.fields_total, a.fields_equal) == (4, 3)
    assert a.score == pytest.approx(0.75) and a.agreed is False
    assert same_fields(reference, reference).agreed is True
    assert same_fields({}, {}).agreed is True


def test_values_that_are_not_objects_count_as_one_field() -> None:
    assert same_fields([1], ["1"]).agreed is True
    a = same_fields("x", {"a": 1})
    assert (a.fields_total, a.fields_equal, a.agreed) == (1, 0, False)


def test_labels_agree_only_when_the_same() -> None:
    assert same_label({"label": "billing"}, {"label": "billing"}).agreed is True
    assert same_label({"label": "billing"}, {"label": "bug"}).score == 0.0


def test_the_judge_answer_is_read_or_is_no_verdict() -> None:
    yes = parse_judge('{"as_good": true, "reason": "same"}')
    assert yes is not None and yes.agreed and yes.reason == "same"
    no = parse_judge('```json\n{"as_good": false, "reason": "misses the apology"}\n```')
    assert no is not None and not no.agreed and no.score == 0.0
    assert parse_judge('{"as_good": "yes"}') is None
    assert parse_judge("I think it is fine") is None
    assert parse_judge(None) is None
