"""Intervals and tests for a pruning study's report: pruned vs control on the same images (paired), across
seeds, and speedups from paired timings. Each function names its method in its docstring.

Standard library at import; numpy (and scipy, for the two t-based functions only) inside the functions.
"""

import math
from statistics import NormalDist

from .errors import UserError

NAN = float("nan")


def _z(level):
    """Two-sided normal quantile for a confidence ``level`` in (0, 1)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _scipy_stats(what):
    """scipy.stats, or a UserError naming ``what`` needs it (scipy is optional)."""
    try:
        import scipy.stats
    except ImportError:
        raise UserError(f"{what} needs scipy: pip install scipy") from None
    return scipy.stats


def wilson(k, n, level=0.95):
    """Wilson score interval (no continuity correction) for k successes of n: sane near 0 and 1, unlike Wald."""
    if n == 0:
        return NAN, NAN
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = _z(level)
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At k == 0 (k == n) the bound is exactly 0 (1); set it so rounding cannot leave 1e-17 there.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value (binomial test of b vs c at 1/2), in integers so huge n cannot overflow."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail, term = 0, 1  # term = C(n, i), updated in place: one pass instead of n calls to math.comb
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, (2 * tail) / (1 << n))  # int / int: correctly rounded, no float overflow


def discordant(correct_a, correct_b):
    """Discordant pair counts (b: a right & b wrong, c: a wrong & b right) from per-image correctness."""
    import numpy as np

    a, b = np.asarray(correct_a).astype(bool).ravel(), np.asarray(correct_b).astype(bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"correctness arrays differ in length: {a.size} vs {b.size}")
    return int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))


def paired_diff_interval(b, c, n, level=0.95):
    """Bonett–Price (2012) adjusted Wald interval for p_a - p_b = (b - c)/n of paired proportions."""
    if n == 0:
        return NAN, NAN
    if min(b, c) < 0 or b + c > n:
        raise ValueError(f"need 0 <= b, c and b + c <= n, got b={b}, c={c}, n={n}")
    p12, p21 = (b + 1) / (n + 2), (c + 1) / (n + 2)
    d = p12 - p21
    half = _z(level) * math.sqrt(max(0.0, p12 + p21 - d * d) / (n + 2))
    return max(-1.0, d - half), min(1.0, d + half)


def _finite_order(pvalues):
    """The p-values as floats (None as NaN), and the indices of the non-NaN ones sorted by p (ascending)."""
    ps = [NAN if p is None else float(p) for p in pvalues]
    return ps, sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])


def holm(pvalues):
    """Holm–Bonferroni step-down adjusted p-values (family-wise error), input order; NaNs kept, not counted."""
    ps, order = _finite_order(pvalues)
    out, m, running = [NAN] * len(ps), len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues):
    """Benjamini–Hochberg step-up adjusted p-values (false discovery rate), input order; NaNs as in holm."""
    ps, order = _finite_order(pvalues)
    out, m, running = [NAN] * len(ps), len(order), 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, m * ps[i] / (rank + 1))
        out[i] = running
    return out


def t_interval(xs, level=0.95):
    """Mean and Student-t interval of a small sample (e.g. one metric across seeds); needs scipy."""
    import numpy as np

    st = _scipy_stats("t_interval")  # asked first, so a missing scipy fails the same way for any sample
    _z(level)  # validates level
    x = np.asarray(xs, dtype=float).ravel()
    if x.size == 0:
        return NAN, NAN, NAN
    mean = float(x.mean())
    if x.size < 2:
        return mean, NAN, NAN
    half = float(st.t.ppf(0.5 + level / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def paired_t(diffs):
    """Two-sided one-sample t-test p-value that mean(diffs) == 0 (paired t on per-seed differences); needs scipy."""
    import numpy as np

    st = _scipy_stats("paired_t")
    d = np.asarray(diffs, dtype=float).ravel()
    if d.size < 2:
        return NAN
    if np.all(d == d[0]):  # zero variance: t is 0/0 or ±inf
        return 1.0 if d[0] == 0 else 0.0
    t = float(d.mean()) / (float(d.std(ddof=1)) / math.sqrt(d.size))
    return float(2 * st.t.sf(abs(t), d.size - 1))


def bootstrap_ratio(numer, denom, level=0.95, n_boot=2000, seed=0):
    """Median of paired ratios numer[i]/denom[i] (e.g. a speedup) with its percentile-bootstrap interval."""
    import numpy as np

    a, b = np.asarray(numer, dtype=float).ravel(), np.asarray(denom, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"numer and denom differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        return NAN, NAN, NAN
    _z(level)  # validates level
    ratios = a / b
    idx = np.random.default_rng(seed).integers(0, ratios.size, size=(n_boot, ratios.size))
    medians = np.median(ratios[idx], axis=1)  # resample whole pairs: the pairing carries drift between runs
    lo, hi = np.quantile(medians, [0.5 - level / 2, 0.5 + level / 2])
    return float(np.median(ratios)), float(lo), float(hi)


def verdict(lo, hi, p_adjusted, alpha=0.05):
    """'better' / 'worse' only when the adjusted test rejects and the interval agrees; else no detectable difference."""
    if p_adjusted is None or math.isnan(p_adjusted) or not p_adjusted < alpha:
        return "no detectable difference"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no detectable difference"
