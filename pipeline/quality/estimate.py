"""Estimators over the shadowed sample.

Per stratum (final tier x triage difficulty) the agreement is the share of shadowed jobs that
agreed, with its 95% Wilson score interval, which stays inside [0, 1] and is fair at small n and
at 0 or 100%, where the normal approximation collapses to a point.

Over a batch the sample is stratified: each stratum's agreement weighted by its share of the
batch's succeeded jobs. A stratum at the reference tier agrees by definition (it is not
shadowed), so it enters with agreement 1 and no variance. A stratum with jobs but no shadowed job
yet cannot be estimated: it is left out and the weights renormalised over the strata covered,
and ``coverage`` says what share of the jobs that is. The interval combines each stratum's
Wilson centre and its variance (the Agresti-Coull form of Wilson's adjustment), so a stratum
where every shadowed job agreed still widens it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def wilson(successes: int, n: int, *, z: float = Z95) -> Interval | None:
    """The Wilson score interval of ``successes`` out of ``n``; None for n = 0 (nothing sampled)."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Stratum:
    jobs: float  # succeeded jobs in the stratum: its weight (whatif's are expected counts)
    shadowed: int  # shadowed jobs with a result
    agreed: int
    exact: bool = False  # at the reference tier: agreement 1 by definition, not sampled


@dataclass(frozen=True)
class Estimate:
    agreement: float
    interval: Interval
    coverage: float  # the share of the jobs in strata that could be estimated


def stratified(strata: list[Stratum], *, z: float = Z95) -> Estimate | None:
    """The stratified estimate of agreement over ``strata``; None when no stratum can be estimated
    (no shadowed result yet, and no job at the reference tier)."""
    covered = [s for s in strata if s.jobs > 0 and (s.exact or s.shadowed > 0)]
    total = sum(s.jobs for s in strata if s.jobs > 0)
    weight = sum(s.jobs for s in covered)
    if not covered or weight == 0:
        return None
    z2 = z * z
    point = centre = variance = 0.0
    for s in covered:
        w = s.jobs / weight
        if s.exact:
            point += w
            centre += w
            continue
        point += w * s.agreed / s.shadowed
        adjusted = (s.agreed + z2 / 2) / (s.shadowed + z2)
        centre += w * adjusted
        variance += w * w * adjusted * (1 - adjusted) / (s.shadowed + z2)
    half = z * math.sqrt(variance)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return Estimate(point, Interval(min(low, point), max(high, point)), weight / total)
