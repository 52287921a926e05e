"""Intervals: Wilson for proportions (exact ends) and for bounded means (rescaled), normal for unbounded means,
never a zero width: none for an unbounded mean of fewer than two items or with no spread."""

import math

import pytest

from posttrain.evaluate.stats import mean_interval, paired_sign_test, wilson_interval

Z = 1.959963984540054


def test_wilson_matches_the_closed_form_and_is_exact_at_the_ends():
    z = 1.959963984540054
    n, k = 20, 7
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (None, None)


def test_unbounded_mean_interval_is_normal_and_absent_without_spread():
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in (1, 2, 3, 4)) / 3)
    assert mean == 2.5 and lo == pytest.approx(2.5 - Z * sd / 2) and hi == pytest.approx(2.5 + Z * sd / 2)
    assert mean_interval([5.0]) == (5.0, None, None)
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, None, None)  # zero sample variance is not certainty
    assert mean_interval([1.0, 10.0], low=1.0)[1] == 1.0  # one bound given: the normal interval, clipped


def test_binary_values_in_a_bounded_mean_get_the_proportions_wilson_interval():
    # pass@1 from 2 samples on 3 problems that all failed: 0/3, not a zero-width [0, 0].
    assert mean_interval([0.0, 0.0, 0.0], 0.0, 1.0) == (0.0, 0.0, pytest.approx(Z * Z / (3 + Z * Z)))
    assert Z * Z / (3 + Z * Z) == pytest.approx(0.5615, abs=1e-4)
    assert mean_interval([1.0, 0.0, 1.0, 1.0], 0.0, 1.0) == (0.75, *wilson_interval(3, 4))
    assert mean_interval([1.0, 1.0], 0.0, 1.0) == (1.0, wilson_interval(2, 2)[0], 1.0)


def _wilson(p, n):
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def test_fractional_bounded_means_use_wilson_on_the_rescaled_mean_even_without_spread():
    # Each of 3 problems passed 1 of its 2 samples: pass@1 = 0.5 for every item, sample variance 0.
    mean, lo, hi = mean_interval([0.5, 0.5, 0.5], 0.0, 1.0)
    assert mean == 0.5 and (lo, hi) == pytest.approx(_wilson(0.5, 3))
    assert (lo, hi) == pytest.approx((0.1253, 0.8747), abs=1e-4)
    # MT-Bench ratings in [1, 10], a judge that said 9 four times: Wilson of 8/9 with n=4, mapped back.
    mean, lo, hi = mean_interval([9.0, 9.0, 9.0, 9.0], 1.0, 10.0)
    wlo, whi = _wilson(8 / 9, 4)
    assert mean == 9.0 and lo == pytest.approx(1 + 9 * wlo) and hi == pytest.approx(1 + 9 * whi)
    assert lo < 9.0 < hi < 10.0
    # mc2-like scores with spread: still the rescaled mean's interval, never narrower than the data allow.
    mean, lo, hi = mean_interval([0.2, 0.4, 0.9], 0.0, 1.0)
    assert mean == pytest.approx(0.5) and (lo, hi) == pytest.approx(_wilson(0.5, 3))
    # One item has an interval too (a proportion of one does).
    assert mean_interval([7.0], 1.0, 10.0)[1:] == pytest.approx(tuple(1 + 9 * b for b in _wilson(6 / 9, 1)))


def test_bounded_mean_refuses_values_outside_the_range():
    with pytest.raises(ValueError, match=r"values outside their range \[0.0, 1.0\]: \[1.5\]"):
        mean_interval([0.5, 1.5], 0.0, 1.0)


@pytest.mark.parametrize("gained,lost,p", [
    (0, 0, 1.0),            # nothing changed
    (1, 0, 1.0),            # one flip is no evidence: 2 * 1/2
    (10, 0, 2 / 1024),      # 2 * (1/2)^10
    (7, 3, 352 / 1024),     # 2 * (C(10,0) + C(10,1) + C(10,2) + C(10,3)) / 2^10 = 2 * 176 / 1024
    (3, 7, 352 / 1024),     # symmetric
])
def test_paired_sign_test_exact_values(gained, lost, p):
    # Items: `gained` wrong -> right, `lost` right -> wrong, plus unchanged ones that must not count.
    before = [False] * gained + [True] * lost + [True] * 5 + [False] * 4
    after = [True] * gained + [False] * lost + [True] * 5 + [False] * 4
    assert paired_sign_test(before, after) == (gained, lost, pytest.approx(p, abs=0, rel=1e-12))


def test_paired_sign_test_refuses_unpaired_scorings():
    with pytest.raises(ValueError, match="3 items before but 2 after"):
        paired_sign_test([True, False, True], [True, False])
