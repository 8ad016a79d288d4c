"""The report's statistics on studies whose answer is known: pruned and control a single image apart is no
detectable difference, a wide margin is 'better'; results-changing settings cannot change mid-study."""
import numpy as np
import pytest

from pruneflow.record import TrialRecord
from pruneflow.results import ResultStore, read_study

N_TEST, N_VAL = 400, 100


def record(arm, method, sparsity, seed, right):
    """A done trial that gets the first ``right`` test images (and the same share of val) right."""
    labels = np.random.default_rng(0).integers(0, 10, N_TEST).astype("u1")  # one test set for every trial
    pred = labels.copy()
    pred[right:] = (labels[right:] + 1) % 10
    val_labels = labels[:N_VAL].copy()
    val_pred = pred[:N_VAL].copy()
    tid = f"{arm}-s{seed}" if arm != "pruned" else f"{method}-{sparsity:.2f}-s{seed}"
    return TrialRecord(id=tid, arm=arm, method=method, sparsity=sparsity, seed=seed, status="done", model="m",
                       dataset="digits", params=10, macs=20, mac_reduction=2.0, train_acc=1.0,
                       val_acc=float((val_pred == val_labels).mean()), test_acc=right / N_TEST,
                       latency_mean=1.0, latency_std=0.1, latency_median=1.0, checkpoint=f"checkpoints/{tid}.st",
                       channel_sparsity=0.3 if arm == "pruned" else 0.0, split_sha="abc",
                       latency=[1.0, 1.1, 0.9], latency_dense=[2.0, 2.1, 1.9] if arm != "dense" else [],
                       test_pred=pred, test_labels=labels, val_pred=val_pred, val_labels=val_labels,
                       device="cpu", device_name="cpu")


def study(tmp_path, pruned_right, control_right=300, seeds=(0, 1, 2)):
    d = tmp_path / "s"
    d.mkdir()
    with ResultStore(d / "shard-0-of-1.h5", "s", config={"prune": {"methods": ["l1"], "sparsities": [0.5]},
                                                        "seeds": list(seeds)}) as store:
        for s in seeds:
            store.add(record("dense", "none", 0.0, s, 300))
            store.add(record("control", "none", 0.0, s, control_right))
            store.add(record("pruned", "l1", 0.5, s, pruned_right))
    return d


def comparison(d):
    from pruneflow.compare import grid_comparisons

    (c,) = grid_comparisons(read_study(d))
    return c


def test_one_image_out_of_hundreds_is_no_detectable_difference(tmp_path):
    # each seed: the pruned model gets exactly one test image more right than its control (+0.25 pts); with zero
    # spread across seeds a t-test alone would call it, the images drawn do not (exact McNemar: 3 vs 0 images)
    c = comparison(study(tmp_path, pruned_right=301))
    assert c.diff == pytest.approx(1 / N_TEST) and c.lo < 0 < c.hi
    assert c.p > 0.2 and c.verdict == "no detectable difference"


def test_a_wide_margin_is_better(tmp_path):
    c = comparison(study(tmp_path, pruned_right=360))
    assert c.diff == pytest.approx(60 / N_TEST) and c.lo > 0 and c.p_adjusted < 0.001 and c.verdict == "better"
    (tmp_path / "w").mkdir()
    assert comparison(study(tmp_path / "w", pruned_right=240)).verdict == "worse"


def test_the_summary_states_the_comparison_and_answers_2022(tmp_path):
    from pruneflow.report import make_report

    d = study(tmp_path, pruned_right=301, seeds=(0,))
    written, _ = make_report(str(d), kinds=["summary"], formats=["png"])
    text = open(written[-1]).read()
    assert "## Pruned vs control (test split)" in text and "no detectable difference" in text
    assert "**No.**" in text and "With one seed" in text
    assert "75.2 [70.8, 79.2]" in text  # 301/400 with its Wilson interval, in the trial table


def test_a_rerun_may_not_change_precision(tmp_path):
    import dataclasses

    from pruneflow.errors import UserError
    from pruneflow.spec import StudySpec, config_of, resolve
    from pruneflow.sweep.driver import check_same_settings

    spec = resolve(StudySpec())
    config = dict(config_of(spec), device_kind="cpu")
    with ResultStore(tmp_path / "shard-0-of-1.h5", "s", config=config):
        pass
    check_same_settings(tmp_path / "shard-0-of-1.h5", config)  # the same settings resume
    bf16 = config_of(dataclasses.replace(spec, performance=dataclasses.replace(spec.performance, precision="bf16")))
    with pytest.raises(UserError, match=r"performance.precision 'auto' -> 'bf16'"):
        check_same_settings(tmp_path / "shard-0-of-1.h5", dict(bf16, device_kind="cpu"))
    with pytest.raises(UserError, match=r"device_kind 'cpu' -> 'cuda'"):
        check_same_settings(tmp_path / "shard-0-of-1.h5", dict(config, device_kind="cuda"))


def test_the_study_loads_as_one_dataframe(tmp_path):
    pytest.importorskip("pandas")
    from pruneflow.record import TrialRecord as R
    from pruneflow.study import load

    trials = load(study(tmp_path, pruned_right=360)).trials
    assert len(trials) == 9 and set(f.name for f in __import__("dataclasses").fields(R)) - {"traceback"} <= set(trials)
    row = trials.set_index("id").loc["l1-0.50-s0"]
    assert row.test_acc == pytest.approx(0.9) and row.test_acc_lo < 0.9 < row.test_acc_hi and row.test_n == N_TEST
    assert row.speedup_lo <= 2.0 <= row.speedup_hi
