"""pruneflow.stats against values computed by hand (formulas in the comments), and against scipy."""
import math
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from pruneflow import stats
from pruneflow.errors import UserError


def test_wilson_by_hand():
    # k=8, n=10, z=1.959964, z²=3.841459: centre (0.8 + z²/20) / (1 + z²/10) = 0.992073 / 1.384146 = 0.716740,
    # half z * sqrt(0.8*0.2/10 + z²/400) / 1.384146 = 1.959964 * 0.160036 / 1.384146 = 0.226612
    lo, hi = stats.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # k=0: centre == half exactly, so lo = 0; hi = 2 * (z²/20) / (1 + z²/10) = z²/(n + z²) = 3.8415/13.8415
    lo, hi = stats.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson(10, 10)  # the mirror image of k=0
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=1e-4)
    assert all(math.isnan(x) for x in stats.wilson(0, 0))
    with pytest.raises(ValueError):
        stats.wilson(11, 10)


def test_mcnemar_exact_by_hand():
    assert stats.mcnemar_exact(1, 0) == 1.0  # 2 * P(X <= 0 | n=1) = 2 * 1/2, capped at 1
    assert stats.mcnemar_exact(0, 5) == pytest.approx(0.0625)  # 2 * (1/2)^5 = 2/32
    assert stats.mcnemar_exact(5, 0) == stats.mcnemar_exact(0, 5)  # two-sided: symmetric in b, c
    assert stats.mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096)  # C(12,0)+C(12,1)+C(12,2) = 1+12+66 = 79
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_at_twenty_thousand_discordant_images():
    # n = 20000: 2^20000 is far beyond a float; the tail is summed in integers and divided once
    start = time.perf_counter()
    assert stats.mcnemar_exact(10000, 10000) == pytest.approx(1.0)
    assert 0 < stats.mcnemar_exact(9700, 10300) < 1e-4  # 300 apart: z ~ 600/sqrt(20000) = 4.2
    assert time.perf_counter() - start < 2  # one pass, not one math.comb per term (tens of seconds)


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
    # b (a right, b wrong): images 10-17 = 8; c (a wrong, b right): images 1, 2 = 2; image 0: both wrong
    assert stats.discordant(right_a, right_b) == (8, 2)
    assert stats.discordant(right_b, right_a) == (2, 8)
    import numpy as np

    assert stats.discordant(np.array(right_a, dtype=int), np.array(right_b)) == (8, 2)  # 0-1 and bool arrays
    # n = 10, min = 2: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * (1 + 10 + 45) / 1024 = 0.109375
    assert stats.mcnemar_exact(*stats.discordant(right_a, right_b)) == pytest.approx(0.109375)
    with pytest.raises(ValueError):
        stats.discordant([True], [True, False])


def test_holm_and_benjamini_hochberg_by_hand():
    # sorted 0.01, 0.03, 0.04: Holm 3*0.01 = 0.03, max(0.03, 2*0.03) = 0.06, max(0.06, 1*0.04) = 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # BH from the top: 0.04*3/3 = 0.04, min(0.04, 0.03*3/2 = 0.045) = 0.04, min(0.04, 0.01*3/1) = 0.03
    assert stats.benjamini_hochberg([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.04, 0.04])
    # NaN stays NaN and m = 2: Holm 2*0.01 = 0.02, max(0.02, 1*0.2) = 0.2; BH 0.2*2/2, min(0.2, 0.01*2/1)
    adjusted = stats.holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    adjusted = stats.benjamini_hochberg([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # 2*0.5 = 1, 2*0.6 capped at 1
    assert stats.benjamini_hochberg([0.9, 0.95]) == pytest.approx([0.95, 0.95])  # min(0.9*2, 0.95)
    assert stats.holm([]) == [] and stats.benjamini_hochberg([]) == []


def test_the_paired_difference_interval():
    # b=60, c=0, n=400: p12 = 61/402 = 0.151741, p21 = 1/402 = 0.002488, d = 0.149254,
    # se = sqrt((0.154229 - 0.022277) / 402) = 0.018117, d ± 1.959964 * se = [0.1137, 0.1848]
    lo, hi = stats.paired_diff_interval(60, 0, 400)
    assert lo == pytest.approx(0.1137, abs=1e-4) and hi == pytest.approx(0.1848, abs=1e-4)
    lo2, hi2 = stats.paired_diff_interval(0, 60, 400)
    assert (lo2, hi2) == pytest.approx((-hi, -lo))  # swapping the arms mirrors it
    lo, hi = stats.paired_diff_interval(1, 0, 400)  # one image apart out of 400
    assert lo < 0 < hi
    # b=10, c=0, n=10: p12 = 11/12, p21 = 1/12, d = 0.833333, se = sqrt((1 - 0.694444) / 12) = 0.159571,
    # d - 1.959964 * se = 0.5206; d + z * se = 1.146, clipped at 1
    assert stats.paired_diff_interval(10, 0, 10) == (pytest.approx(0.5206, abs=1e-4), 1.0)
    assert all(math.isnan(x) for x in stats.paired_diff_interval(0, 0, 0))
    with pytest.raises(ValueError):
        stats.paired_diff_interval(6, 5, 10)  # more discordant images than images


def test_verdict():
    assert stats.verdict(0.01, 0.05, 0.001) == "better"
    assert stats.verdict(-0.05, -0.01, 0.001) == "worse"
    assert stats.verdict(-0.01, 0.05, 0.001) == "no detectable difference"  # test rejects, interval spans 0
    assert stats.verdict(0.01, 0.05, 0.2) == "no detectable difference"
    assert stats.verdict(0.01, 0.05, 0.05) == "no detectable difference"  # p < alpha, strictly
    assert stats.verdict(0.01, 0.05, math.nan) == "no detectable difference"


def test_bootstrap_of_a_ratio():
    # every pair has ratio 2.0, so every resample's median is 2.0
    assert stats.bootstrap_ratio([2.0, 4.0, 6.0, 9.0], [1.0, 2.0, 3.0, 4.5]) == (2.0, 2.0, 2.0)
    import numpy as np

    rng = np.random.default_rng(1)
    dense, own = 2 + rng.random(25), 1 + rng.random(25)
    point, lo, hi = stats.bootstrap_ratio(dense, own)
    assert point == pytest.approx(float(np.median(dense / own)))
    assert lo <= point <= hi and lo < hi
    assert stats.bootstrap_ratio(dense, own) == (point, lo, hi)  # seeded
    narrow = stats.bootstrap_ratio(dense, own, level=0.5)
    assert lo <= narrow[1] <= narrow[2] <= hi
    assert all(math.isnan(x) for x in stats.bootstrap_ratio([], []))
    with pytest.raises(ValueError):
        stats.bootstrap_ratio([1.0, 2.0], [1.0])


def test_t_interval_and_paired_t_edge_cases():
    pytest.importorskip("scipy")
    assert all(math.isnan(x) for x in stats.t_interval([]))
    m, lo, hi = stats.t_interval([0.3])
    assert m == 0.3 and math.isnan(lo) and math.isnan(hi)
    assert math.isnan(stats.paired_t([0.1]))
    assert stats.paired_t([0.0, 0.0, 0.0]) == 1.0
    assert stats.paired_t([0.02, 0.02, 0.02]) == 0.0


def test_without_scipy_the_t_functions_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    for fn in (stats.t_interval, stats.paired_t):
        with pytest.raises(UserError, match="pip install scipy"):
            fn([0.1, 0.2, 0.4])
    assert stats.mcnemar_exact(0, 5) == pytest.approx(0.0625)  # the rest needs no scipy


def test_importing_stats_loads_neither_numpy_nor_scipy():
    code = "import sys, pruneflow.stats; print(sorted({'numpy', 'scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in ((1, 0), (0, 5), (2, 10), (7, 9), (30, 12), (400, 460), (1000, 1150)):
        assert stats.mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue)
    for level in (0.95, 0.9):
        z = scipy_stats.norm.ppf(0.5 + level / 2)
        for k, n in ((8, 10), (301, 400), (1, 144), (9, 10)):
            p = k / n
            centre = (p + z * z / (2 * n)) / (1 + z * z / n)
            half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
            assert stats.wilson(k, n, level) == pytest.approx((centre - half, centre + half))
    for xs in ([0.012, -0.004, 0.02, 0.007], [1.5, 2.5, 2.0, 3.1, 0.9, 2.2]):
        m, lo, hi = stats.t_interval(xs, 0.9)
        want = scipy_stats.t.interval(0.9, len(xs) - 1, loc=sum(xs) / len(xs), scale=scipy_stats.sem(xs))
        assert m == pytest.approx(sum(xs) / len(xs)) and (lo, hi) == pytest.approx(want)
        assert stats.paired_t(xs) == pytest.approx(scipy_stats.ttest_1samp(xs, 0).pvalue)
