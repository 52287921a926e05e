"""Intervals: Wilson for proportions (exact ends), normal for means, none for fewer than two items."""

import math

import pytest

from posttrain.evaluate.stats import mean_interval, wilson_interval


def test_wilson_matches_the_closed_form_and_is_exact_at_the_ends():
    z = 1.959963984540054
    n, k = 20, 7
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (None, None)


def test_mean_interval():
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in (1, 2, 3, 4)) / 3)
    assert mean == 2.5 and lo == pytest.approx(2.5 - 1.959963984540054 * sd / 2)
    assert mean_interval([5.0]) == (5.0, None, None)
    assert mean_interval([1.0, 10.0], low=1.0, high=10.0)[1] == 1.0
