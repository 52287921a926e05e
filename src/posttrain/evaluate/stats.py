"""Confidence intervals for benchmark metrics: every reported number comes with n and a 95% interval.

Guarantees: proportions (accuracy, exact match, pass@1 with one sample) use the Wilson score interval, which stays
inside [0, 1] and is defined for 0 and n successes; means of bounded per-item scores (mc2, pass@k, MT-Bench ratings)
use the normal approximation with the sample standard deviation (n − 1), clipped to the score's range. With fewer
than two items a mean has no interval: both bounds are None, never a made-up width.
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
    """(mean, ci_low, ci_high); the bounds are clipped to [low, high] when given."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    lo, hi = mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)
    if low is not None:
        lo = max(low, lo)
    if high is not None:
        hi = min(high, hi)
    return mean, lo, hi
