"""Confidence intervals for benchmark metrics: every reported number comes with n and a 95% interval.

Guarantees:
- Proportions (accuracy, exact match, greedy pass@1, win rate) use the Wilson score interval, which stays inside
  [0, 1], is exact at the ends (the bound is 0 when none and 1 when all succeeded) and never has zero width for
  n >= 1: 0 of 3 gives [0, 0.561], not [0, 0].
- Means of bounded per-item scores (sampled pass@k, mc2, MT-Bench ratings: anything with a known range [low, high])
  use the Wilson interval of the mean rescaled to [0, 1], with the n items as the count: `wilson(n * m, n)` for
  m = mean((v - low) / (high - low)), mapped back to [low, high]. Why: a score in [0, 1] with mean m has variance at
  most m(1 - m) (Bhatia–Davis; equality only when every item is 0 or 1), and the Wilson interval is the score
  interval for exactly that worst-case variance. So it is conservative — never narrower than the interval the
  true per-item variance would give — and it does not collapse when the sample happens to show no spread (three
  problems that each passed one of two samples, a judge that rated every answer 9): a sample variance of zero
  from a handful of items is no evidence of certainty. When every item is at an end of the range it is exactly
  the proportion's Wilson interval. The price is width: for many items with little spread it is wider than the
  usual standard-error interval, which is the side we choose to err on.
- Means without a known range use the normal approximation with the sample standard deviation (n − 1), clipped to
  a bound when one is given. Such a mean has no interval (both bounds None, never a made-up or zero width) when
  there are fewer than two items or the sample variance is zero.
- Two scorings of the same items (base vs aligned) are compared by the exact McNemar test (`paired_sign_test`), which
  uses only the items whose outcome changed: the question "did it get better" is about those, not about two
  overlapping intervals.
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    if n <= 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact at the ends: the bound is 0 (or 1) when none (or all) succeeded; floating point leaves ~1e-17 otherwise.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def mean_interval(values: Sequence[float], low: float | None = None, high: float | None = None,
                  z: float = Z95) -> tuple[float, float | None, float | None]:
    """(mean, ci_low, ci_high). With both `low` and `high` (the score's range) the bounded-mean Wilson interval,
    else the normal interval clipped to the one bound given; see the module docstring."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if low is not None and high is not None:
        return (mean, *_bounded_mean_interval(values, low, high, z))
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0.0:
        return mean, None, None
    lo, hi = mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)
    if low is not None:
        lo = max(low, lo)
    if high is not None:
        hi = min(high, hi)
    return mean, lo, hi


def _bounded_mean_interval(values: Sequence[float], low: float, high: float,
                           z: float) -> tuple[float | None, float | None]:
    if not high > low:
        raise ValueError(f"a bounded mean needs low < high, got [{low}, {high}]")
    outside = [v for v in values if not low <= v <= high]
    if outside:
        raise ValueError(f"values outside their range [{low}, {high}]: {outside[:3]}")
    span = high - low
    # Summed on the [0, 1] scale so that items at the ends add exact 0s and 1s: all-0/1 data is the proportion.
    lo, hi = wilson_interval(sum((v - low) / span for v in values), len(values), z)
    return low + span * lo, low + span * hi


def paired_sign_test(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test for two scorings of the same items: ``(gained, lost, p)``.

    ``gained`` counts items wrong before and right after, ``lost`` the reverse; ``p`` is the two-sided exact
    binomial p-value of that split under "no change" (each discordant item equally likely to go either way):
    ``min(1, 2 * P(X <= min(gained, lost)))`` for X ~ Binomial(gained + lost, 1/2); 1.0 when nothing changed.
    Raises ``ValueError`` when the two scorings differ in length.
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} items before but {len(after)} after")
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return gained, lost, min(1.0, 2 * tail)
