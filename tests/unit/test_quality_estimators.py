"""The estimators of `switchyard quality`: Wilson intervals and the stratified estimate."""

from __future__ import annotations

import pytest

from pipeline.quality.estimate import Stratum, stratified, wilson


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3.
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
])
def test_wilson_matches_published_values(successes: int, n: int, low: float, high: float) -> None:
    interval = wilson(successes, n)
    assert interval is not None
    assert interval.low == pytest.approx(low, abs=5e-5)
    assert interval.high == pytest.approx(high, abs=5e-5)


def test_wilson_of_nothing_sampled_is_none_not_a_division_by_zero() -> None:
    assert wilson(0, 0) is None
    with pytest.raises(ValueError, match="3 successes out of 2"):
        wilson(3, 2)


def test_stratified_weights_each_stratum_by_its_jobs_not_by_its_sample() -> None:
    # Sonnet's easy jobs sampled at 10%, all agreeing; a small stratum sampled whole, none agreeing.
    # Pooling the sample would say 9/19; the batch is 90% the first stratum.
    strata = [Stratum(jobs=90, shadowed=9, agreed=9), Stratum(jobs=10, shadowed=10, agreed=0)]
    estimate = stratified(strata)
    assert estimate is not None
    assert estimate.agreement == pytest.approx(0.9)
    assert estimate.coverage == 1.0
    assert 0 <= estimate.interval.low <= 0.9 <= estimate.interval.high <= 1


def test_reference_strata_count_as_agreeing_without_being_sampled() -> None:
    strata = [Stratum(jobs=60, shadowed=10, agreed=8), Stratum(jobs=40, shadowed=5, agreed=5),
              Stratum(jobs=100, shadowed=0, agreed=0, exact=True)]
    estimate = stratified(strata)
    assert estimate is not None
    assert estimate.agreement == pytest.approx(0.3 * 0.8 + 0.2 * 1.0 + 0.5 * 1.0)
    only_reference = stratified([Stratum(jobs=7, shadowed=0, agreed=0, exact=True)])
    assert only_reference is not None
    assert (only_reference.agreement, only_reference.interval.low, only_reference.interval.high) == (1.0, 1.0, 1.0)


def test_a_stratum_with_no_shadow_result_is_left_out_and_the_coverage_says_so() -> None:
    estimate = stratified([Stratum(jobs=30, shadowed=6, agreed=3), Stratum(jobs=70, shadowed=0, agreed=0)])
    assert estimate is not None
    assert estimate.agreement == pytest.approx(0.5)
    assert estimate.coverage == pytest.approx(0.3)


def test_no_shadowed_job_gives_no_estimate() -> None:
    assert stratified([]) is None
    assert stratified([Stratum(jobs=50, shadowed=0, agreed=0), Stratum(jobs=0, shadowed=0, agreed=0)]) is None


def test_the_interval_narrows_as_the_sample_grows_and_widens_even_when_all_agree() -> None:
    small = stratified([Stratum(jobs=1000, shadowed=10, agreed=10)])
    large = stratified([Stratum(jobs=1000, shadowed=400, agreed=400)])
    assert small is not None and large is not None
    assert small.agreement == large.agreement == 1.0
    assert small.interval.low < large.interval.low < 1.0
