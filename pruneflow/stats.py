"""Intervals and tests for a pruning study's report: accuracy on a split, pruned against control on the same
images and across seeds, speedups from paired timings. Each function names its method; exact where it is cheap
(McNemar by integer binomial sums), scipy only for Student's t.
"""

import math
from statistics import NormalDist

from .errors import UserError


def _z(level):
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(k, n, level=0.95):
    """Wilson score interval (no continuity correction) for ``k`` successes of ``n``."""
    if n == 0:
        return math.nan, math.nan
    z, p = _z(level), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value from the discordant counts: 2 P(X <= min(b, c)), X ~ Bin(b + c, 1/2)."""
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(int(b), int(c)) + 1))  # integers: no overflow at any n
    return min(1.0, 2 * tail / 2 ** n)


def discordant(correct_a, correct_b):
    """(b, c): images only ``a`` gets right, images only ``b`` gets right."""
    import numpy as np

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} and {b.shape}")
    return int((a & ~b).sum()), int((~a & b).sum())


def paired_diff_interval(b, c, n, level=0.95):
    """Bonett & Price (2012) adjusted Wald interval for p_a - p_b = (b - c) / n of paired proportions."""
    z = _z(level)
    p12, p21 = (b + 1) / (n + 2), (c + 1) / (n + 2)
    d = p12 - p21
    se = math.sqrt(max(0.0, p12 + p21 - d * d) / (n + 2))
    return max(-1.0, d - z * se), min(1.0, d + z * se)


def _finite(pvalues):
    return [(i, p) for i, p in enumerate(pvalues) if not math.isnan(p)]


def holm(pvalues):
    """Holm–Bonferroni step-down adjusted p-values, in the input order (NaN stays NaN, not counted)."""
    out = [math.nan] * len(pvalues)
    ranked = sorted(_finite(pvalues), key=lambda t: t[1])
    m, running = len(ranked), 0.0
    for rank, (i, p) in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def benjamini_hochberg(pvalues):
    """Benjamini–Hochberg step-up adjusted p-values (false discovery rate), in the input order."""
    out = [math.nan] * len(pvalues)
    ranked = sorted(_finite(pvalues), key=lambda t: t[1])
    m, running = len(ranked), 1.0
    for rank in range(m - 1, -1, -1):
        i, p = ranked[rank]
        running = min(running, p * m / (rank + 1))
        out[i] = min(1.0, running)
    return out


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        raise UserError("intervals across seeds need scipy: pip install scipy") from None
    return stats


def t_interval(xs, level=0.95):
    """(mean, lo, hi): Student-t interval of the mean of ``xs``; lo, hi NaN with fewer than 2 values."""
    xs = [float(x) for x in xs]
    if not xs:
        return math.nan, math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    half = _scipy_stats().t.ppf(0.5 + level / 2, len(xs) - 1) * sd / math.sqrt(len(xs))
    return m, m - half, m + half


def paired_t(diffs):
    """Two-sided one-sample t-test p-value of mean(diffs) == 0 (the paired t-test on differences)."""
    diffs = [float(d) for d in diffs]
    if len(diffs) < 2:
        return math.nan
    m = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
    if sd == 0:
        return 1.0 if m == 0 else 0.0
    t = m / (sd / math.sqrt(len(diffs)))
    return float(2 * _scipy_stats().t.sf(abs(t), len(diffs) - 1))


def bootstrap_ratio(numer, denom, level=0.95, n_boot=2000, seed=0):
    """(median of numer[i] / denom[i], lo, hi): percentile bootstrap of that median, resampling the pairs."""
    import numpy as np

    numer, denom = np.asarray(numer, dtype=float), np.asarray(denom, dtype=float)
    if numer.shape != denom.shape:
        raise ValueError(f"paired samples differ in length: {numer.shape} and {denom.shape}")
    if numer.size == 0:
        return math.nan, math.nan, math.nan
    ratios = numer / denom
    idx = np.random.default_rng(seed).integers(0, ratios.size, (n_boot, ratios.size))
    medians = np.median(ratios[idx], axis=1)
    lo, hi = np.quantile(medians, [0.5 - level / 2, 0.5 + level / 2])
    return float(np.median(ratios)), float(lo), float(hi)


def verdict(lo, hi, p_adjusted, alpha=0.05):
    """'better' / 'worse' when the adjusted p rejects and the interval excludes 0 on that side, else
    'no detectable difference'."""
    if not math.isnan(p_adjusted) and p_adjusted < alpha:
        if lo > 0:
            return "better"
        if hi < 0:
            return "worse"
    return "no detectable difference"
