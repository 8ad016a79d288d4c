"""pruneflow.stats against values computed by hand (formulas in the comments), and against scipy."""
import math

import pytest

from pruneflow import stats


def test_wilson_by_hand():
    # k=8, n=10, z=1.959964: centre (0.8 + z²/20) / (1 + z²/10) = 0.7167, half 0.2266
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = stats.wilson(0, 10)
    assert lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)  # z²/(n + z²) = 3.8415 / 13.8415
    assert all(math.isnan(x) for x in stats.wilson(0, 0))


def test_mcnemar_exact_by_hand():
    assert stats.mcnemar_exact(1, 0) == 1.0  # 2 * P(X <= 0 | n=1) = 2 * 1/2, capped at 1
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert stats.mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # C(12, 0..2)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(10000, 10000) == pytest.approx(1.0)  # n = 20000: integers, no overflow


def test_fixed_predictions_give_the_discordant_counts():
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 4
    a = list(labels)  # a: wrong on images 0-2
    b = list(labels)  # b: wrong on images 0 and 10-17
    for i in (0, 1, 2):
        a[i] = (labels[i] + 1) % 10
    for i in [0] + list(range(10, 18)):
        b[i] = (labels[i] + 1) % 10
    right_a = [p == y for p, y in zip(a, labels)]
    right_b = [p == y for p, y in zip(b, labels)]
    assert stats.discordant(right_a, right_b) == (8, 2)  # a right where b is wrong: 10-17; the reverse: 1, 2
    assert stats.mcnemar_exact(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    with pytest.raises(ValueError):
        stats.discordant([True], [True, False])


def test_holm_and_benjamini_hochberg_by_hand():
    # sorted 0.01, 0.03, 0.04: Holm 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04) -> input order
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # BH: 0.04*3/3 = 0.04, min(0.04, 0.03*3/2 = 0.045), 0.01*3/1 = 0.03
    assert stats.benjamini_hochberg([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.04, 0.04])
    adjusted = stats.holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_the_paired_difference_interval_and_the_verdict():
    lo, hi = stats.paired_diff_interval(1, 0, 400)  # one image apart out of 400
    assert lo < 0 < hi
    lo, hi = stats.paired_diff_interval(60, 0, 400)
    assert 0.1 < lo < 0.15 < hi < 0.2
    assert stats.verdict(0.01, 0.05, 0.001) == "better" and stats.verdict(-0.05, -0.01, 0.001) == "worse"
    assert stats.verdict(-0.01, 0.05, 0.001) == "no detectable difference"
    assert stats.verdict(0.01, 0.05, 0.2) == "no detectable difference"
    assert stats.verdict(0.01, 0.05, math.nan) == "no detectable difference"


def test_bootstrap_of_a_ratio():
    assert stats.bootstrap_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0, 2.0)
    import numpy as np

    rng = np.random.default_rng(1)
    dense, own = 2 + rng.random(25), 1 + rng.random(25)
    point, lo, hi = stats.bootstrap_ratio(dense, own)
    assert lo < point < hi and stats.bootstrap_ratio(dense, own) == (point, lo, hi)  # seeded
    assert all(math.isnan(x) for x in stats.bootstrap_ratio([], []))


def test_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in ((1, 0), (0, 5), (2, 10), (7, 9), (400, 460)):
        assert stats.mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue)
    z = scipy_stats.norm.ppf(0.975)
    for k, n in ((8, 10), (301, 400), (1, 144)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert stats.wilson(k, n) == pytest.approx((centre - half, centre + half))
    xs = [0.012, -0.004, 0.02, 0.007]
    m, lo, hi = stats.t_interval(xs)
    want = scipy_stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 4, scale=scipy_stats.sem(xs))
    assert (lo, hi) == pytest.approx(want) and stats.paired_t(xs) == pytest.approx(scipy_stats.ttest_1samp(xs, 0).pvalue)
