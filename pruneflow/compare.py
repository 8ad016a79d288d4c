"""Pruned against control, with the uncertainty a reviewer asks for: per-trial accuracy intervals from the stored
per-image predictions, paired tests on the same images and across seeds, a Holm correction over the study's grid,
and bootstrap intervals on speedups. Reads trial records as dicts (study.load_study) or TrialRecords.

A difference is called only when it holds against both sources of chance: the images drawn (exact McNemar on the
discordant images, pooled over seeds) and, with two or more seeds, training randomness (paired t across seeds).
"""

import dataclasses
import math

from . import stats

ALPHA = 0.05
CORRECTION = "Holm"


def _get(r, k, default=None):
    return r.get(k, default) if isinstance(r, dict) else getattr(r, k, default)


def correct(r, split):
    """The trial's per-image correctness on ``split`` (val or test) as a numpy bool array, or None (older files)."""
    import numpy as np

    pred, labels = _get(r, f"{split}_pred"), _get(r, f"{split}_labels")
    if pred is None or labels is None or len(pred) == 0 or len(pred) != len(labels):
        return None
    return np.asarray(pred) == np.asarray(labels)


def accuracy_interval(r, split):
    """(accuracy, lo, hi, n): Wilson 95 % on ``split`` from the stored predictions; (acc, nan, nan, 0) without."""
    c = correct(r, split)
    if c is None:
        acc = _get(r, f"{split}_acc")
        return (math.nan if acc is None else acc), math.nan, math.nan, 0
    lo, hi = stats.wilson(int(c.sum()), len(c))
    return float(c.mean()), lo, hi, len(c)


def speedup_interval(rs):
    """(median per-pair speedup, lo, hi): percentile bootstrap over the timed pairs of ``rs`` (pooled)."""
    dense = [x for r in rs for x in (_get(r, "latency_dense") or [])]
    own = [x for r in rs if _get(r, "latency_dense") for x in (_get(r, "latency") or [])]
    if not dense or len(dense) != len(own):
        return math.nan, math.nan, math.nan
    return stats.bootstrap_ratio(dense, own)


def achieved(r):
    """The sparsity a trial reached: channels removed (structured methods), weights zeroed (level)."""
    return _get(r, "weight_sparsity", 0.0) if str(_get(r, "method", "")).startswith("level") else _get(
        r, "channel_sparsity", 0.0)


@dataclasses.dataclass
class Comparison:
    """One grid cell (model, method, nominal sparsity or MAC target) against the control, on ``split``."""

    model: str
    method: str
    sparsity: float
    target: float
    seeds: list
    achieved: float
    split: str
    n_images: int
    pruned: float  # mean accuracy over seeds
    control: float
    diff: float  # pruned - control, mean over seeds (fraction)
    lo: float
    hi: float
    p: float  # the test's p-value, before correction
    p_adjusted: float = math.nan
    test: str = ""
    verdict: str = "no detectable difference"
    speedup: tuple = (math.nan, math.nan, math.nan)
    per_seed_p: list = dataclasses.field(default_factory=list)
    per_seed_diff: list = dataclasses.field(default_factory=list)
    speedup_target: float = 0.0

    def decide(self, p_adjusted):
        """Set the verdict from the adjusted p. A difference every seed shows on its own (exact McNemar) that
        the spread across seeds leaves undecided is named as such: more seeds would settle it."""
        self.p_adjusted = p_adjusted
        self.verdict = stats.verdict(self.lo, self.hi, p_adjusted, ALPHA)
        k = len(self.per_seed_p)
        if (self.verdict == "no detectable difference" and k >= 2 and all(p < ALPHA for p in self.per_seed_p)
                and len({d > 0 for d in self.per_seed_diff}) == 1):
            self.verdict = (f"{'better' if self.diff > 0 else 'worse'} in each of {k} seeds, undecided across "
                            "seeds (run more)")

    @property
    def label(self):
        if self.speedup_target:
            return f"{self.method} {self.speedup_target:g}x faster"
        return f"{self.method} x{self.target:g}" if self.target else f"{self.method} {100 * self.sparsity:.0f} %"

    def sentence(self):
        """'pruned − control = +x.x pts [lo, hi], p = …: verdict'"""
        p = "" if math.isnan(self.p_adjusted) else f", p = {_p(self.p_adjusted)} ({CORRECTION})"
        return (f"pruned − control = {100 * self.diff:+.1f} pts [{100 * self.lo:+.1f}, {100 * self.hi:+.1f}]"
                f"{p}: {self.verdict}")


def _p(p):
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def compare(group, controls, split="test"):
    """A Comparison of ``group`` (one cell's done trials, any seeds) against the done ``controls`` of the same
    seeds; None when no seed has both. The interval is the wider of the pooled paired-proportion one
    (Bonett-Price) and, with >= 2 seeds, the t-interval of the per-seed differences."""
    by_seed = {_get(c, "seed"): c for c in controls}
    pairs = [(r, by_seed[_get(r, "seed")]) for r in group if _get(r, "seed") in by_seed]
    if not pairs:
        return None
    diffs, b_all, c_all, n_all, per_seed, images = [], 0, 0, 0, [], 0
    for r, c in pairs:
        a, b = correct(r, split), correct(c, split)
        if a is not None and b is not None and len(a) == len(b):
            bb, cc = stats.discordant(a, b)
            b_all, c_all, n_all = b_all + bb, c_all + cc, n_all + len(a)
            per_seed.append(stats.mcnemar_exact(bb, cc))
            images = len(a)
            diffs.append((bb - cc) / len(a))
        else:  # files before issue 29: accuracies only, no paired test on images
            diffs.append((_get(r, f"{split}_acc") or math.nan) - (_get(c, f"{split}_acc") or math.nan))
    mean_diff = sum(diffs) / len(diffs)
    lo = hi = math.nan
    p_parts, tests = [], []
    if n_all:
        lo, hi = stats.paired_diff_interval(b_all, c_all, n_all)
        p_parts.append(stats.mcnemar_exact(b_all, c_all))
        tests.append("exact McNemar, pooled over seeds")
    if len(diffs) >= 2 and not any(math.isnan(d) for d in diffs):
        _, tlo, thi = stats.t_interval(diffs)
        lo, hi = (tlo, thi) if math.isnan(lo) else (min(lo, tlo), max(hi, thi))
        p_parts.append(stats.paired_t(diffs))
        tests.append(f"paired t over {len(diffs)} seeds")
    p = max(p_parts) if p_parts else math.nan  # both must reject (intersection-union)
    first = pairs[0][0]
    return Comparison(
        model=_get(first, "model", ""), method=_get(first, "method", ""), sparsity=_get(first, "sparsity", 0.0),
        target=_get(first, "target_mac_reduction", 0.0) or 0.0, seeds=sorted(_get(r, "seed") for r, _ in pairs),
        speedup_target=_get(first, "target_speedup", 0.0) or 0.0,
        achieved=sum(achieved(r) for r, _ in pairs) / len(pairs), split=split, n_images=images,
        pruned=_mean([accuracy_interval(r, split)[0] for r, _ in pairs]),
        control=_mean([accuracy_interval(c, split)[0] for _, c in pairs]), diff=mean_diff, lo=lo, hi=hi, p=p,
        test=" and ".join(tests), speedup=speedup_interval([r for r, _ in pairs]), per_seed_p=per_seed,
        per_seed_diff=diffs)


def _mean(xs):
    return sum(xs) / len(xs) if xs else math.nan


def grid_comparisons(records, split="test"):
    """Every pruned cell of the study against its control, p-values Holm-adjusted over all of them."""
    done = [r for r in records if _get(r, "status") == "done"]
    cells = {}
    for r in done:
        if _get(r, "arm") == "pruned":
            targeted = _get(r, "target_mac_reduction") or _get(r, "target_speedup")  # sparsity found, not set
            key = (_get(r, "model", ""), _get(r, "method"), 0.0 if targeted else round(_get(r, "sparsity", 0.0), 4),
                   _get(r, "target_mac_reduction", 0.0) or 0.0, _get(r, "target_speedup", 0.0) or 0.0)
            cells.setdefault(key, []).append(r)
    out = []
    for key in sorted(cells):
        controls = [r for r in done if _get(r, "arm") == "control" and _get(r, "model", "") == key[0]]
        c = compare(cells[key], controls, split)
        if c is not None:
            out.append(c)
    for c, p in zip(out, stats.holm([c.p for c in out])):
        c.decide(p)
    return out


def control_vs_dense(records, model, split="test"):
    """The control against the dense model (what the extra fine-tuning alone does), not corrected."""
    done = [r for r in records if _get(r, "status") == "done" and _get(r, "model", "") == model]
    c = compare([r for r in done if _get(r, "arm") == "control"], [r for r in done if _get(r, "arm") == "dense"],
                split)
    if c is not None:
        c.decide(c.p)
    return c


def answer_2022(comparisons, records):
    """Markdown lines answering the 2022 report's question: does accuracy rise after pruning, once the control
    (the dense model fine-tuned for the same epochs) is accounted for?"""
    if not comparisons:
        return ["No pruned trial has a control of the same seed to compare with (control: true in the job file)."]
    better = [c for c in comparisons if c.verdict == "better"]
    worse = [c for c in comparisons if c.verdict == "worse"]
    each = [c for c in comparisons if " in each of " in c.verdict]
    seeds = max(len(c.seeds) for c in comparisons)
    lines = [f"{len(comparisons)} pruned cells against the control on the {comparisons[0].split} split "
             f"({comparisons[0].n_images or '?'} images, {seeds} seed(s); {CORRECTION}-adjusted over the grid, "
             f"alpha {ALPHA}): {len(better)} better, {len(worse)} worse, "
             f"{len(each)} better or worse in every seed but undecided across seeds, "
             f"{len(comparisons) - len(better) - len(worse) - len(each)} with no detectable difference.", ""]
    if better:
        lines.append("**Yes, for some cells**: " + "; ".join(f"{c.label} ({c.sentence()})" for c in better) + ".")
    else:
        lines.append("**No.** Once the control is accounted for, no pruned model is detectably more accurate than "
                     "the dense model fine-tuned for the same epochs.")
    for model in sorted({c.model for c in comparisons}):
        cd = control_vs_dense(records, model, comparisons[0].split)
        if cd is not None:
            lines += ["", f"{model}: control − dense (the fine-tuning alone, no pruning): "
                      f"{cd.sentence().replace('pruned − control', 'control − dense').replace(CORRECTION, 'uncorrected')}. A pruned model that beats "
                      "the dense model by about this much owes it to the extra training, not to pruning."]
    if seeds < 2:
        lines += ["", "With one seed the intervals cover only which images were drawn, not training randomness: "
                  "run more seeds (seeds: [0, 1, 2]) before reading a small difference."]
    return lines
