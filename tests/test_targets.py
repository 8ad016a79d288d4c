"""Pruning to a measured speedup (bisection on real paired timings) and prune.round_to as a sweep axis (issue 30)."""

import pytest
import torch

from conftest import assert_clean_error, report_of, run_module
from pruneflow.models import build_model
from pruneflow.results import read_trials
from pruneflow.spec import grid, load_spec
from pruneflow.speedup import LADDER, prune_to_speedup

KW = dict(op_types=("Conv2d", "Linear"), exclude=("fc2",))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model("simple_cnn", in_channels=1).eval()


def test_a_reachable_speedup_target_is_met_by_a_measured_probe(cnn):
    torch.set_num_threads(1)
    pruned, stats, search = prune_to_speedup(cnn, "l1@depgraph", 1.3, (1, 28, 28), torch.device("cpu"),
                                             batch_size=32, **KW)
    assert search.reached and search.speedup >= 1.3 and stats["target_speedup"] == 1.3
    kept = [p for p in search.probes if p.sparsity == pytest.approx(search.sparsity)]
    assert kept and kept[0].speedup >= 1.3 and kept[0].lo <= kept[0].speedup <= kept[0].hi
    assert len(search.probes) >= 2  # the top of the ladder, then at least one bisection step
    assert stats["macs"] < stats["macs_dense"]  # the model returned is the pruned one


def test_an_unreachable_target_reports_the_best_try_not_a_fake(cnn):
    _, stats, search = prune_to_speedup(cnn, "l1@depgraph", 1000.0, (1, 28, 28), torch.device("cpu"),
                                        batch_size=8, trials=5, **KW)
    assert not search.reached and len(search.probes) == len(LADDER)
    best = max(search.probes, key=lambda p: p.speedup)
    assert search.speedup == pytest.approx(best.speedup) and search.sparsity == pytest.approx(best.sparsity)
    assert search.speedup < 1000


def test_round_to_lists_expand_the_grid_for_depgraph_methods_only():
    spec, _ = load_spec("jobs/quickstart.yaml", {"seeds": [0], "control": False, "prune.methods": ["l1", "l1@depgraph"],
                                                 "prune.sparsities": [0.5], "prune.round_to": [None, 8, 32],
                                                 "prune.speedup_targets": [2]})
    ids = [t.id for t in grid(spec)]
    assert ids == ["dense-s0", "l1-0.50-s0", "l1-t2.00-s0",
                   "l1@depgraph-0.50-r1-s0", "l1@depgraph-t2.00-r1-s0", "l1@depgraph-0.50-r8-s0",
                   "l1@depgraph-t2.00-r8-s0", "l1@depgraph-0.50-r32-s0", "l1@depgraph-t2.00-r32-s0"]
    one, _ = load_spec("jobs/quickstart.yaml", {"seeds": [0], "prune.methods": ["l1@depgraph"], "prune.round_to": 8})
    assert all("-r" not in t.id and t.round_to in (8, None) for t in grid(one))  # a single value keeps old ids


def test_prune_cli_targets_a_measured_speedup(dense_ckpt, tmp_path):
    out = tmp_path / "p.safetensors"
    p = run_module("pruneflow.prune", dense_ckpt, "l1@depgraph", out, "--target-speedup", 1.3, "--batch", 16,
                   "--threads", 1, "--noprint_model")
    assert p.returncode == 0, p.stderr
    assert "speedup target 1.3x in eager at batch 16: reached" in p.stdout and "probes (sparsity" in p.stdout
    for args, needle in ((["--target-speedup", 1], "--target-speedup must be a number > 1"),
                         (["--target-speedup", 2, "--sparsity", 0.5], "give exactly one of"),
                         (["--target-speedup", 2, "--runtime", "trt"], "unknown runtime 'trt'"),
                         (["--target-speedup", 2, "--batch", 0], "--batch must be a whole number >= 1")):
        assert_clean_error(run_module("pruneflow.prune", dense_ckpt, "l1@depgraph", out, *args), needle)
    p = run_module("pruneflow.prune", dense_ckpt, "level", out, "--target-speedup", 2)
    assert_clean_error(p, "level pruning keeps every shape")


def test_a_sweep_with_speedup_targets_and_a_rounding_axis(dense_ckpt, tmp_path):
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, "--seeds", "[0]", "--dense",
                   dense_ckpt, "--nocontrol", "--prune.methods", "[l1@depgraph]", "--prune.sparsities", "[0.5]",
                   "--prune.round_to", "[null, 8]", "--prune.speedup_targets", "[1.2, 1000]", "--finetune.epochs", 1,
                   "--latency.trials", 3, "--latency.target_batch", 16, "--noprogress")
    assert p.returncode == 0, p.stdout + p.stderr
    study = tmp_path / "quickstart"
    trials = {r["id"]: r for r in read_trials(study / "shard-0-of-1.h5")}
    assert {"l1@depgraph-0.50-r1-s0", "l1@depgraph-0.50-r8-s0", "l1@depgraph-t1.20-r8-s0"} <= set(trials)
    assert trials["l1@depgraph-0.50-r8-s0"]["round_to"] == 8 and trials["l1@depgraph-0.50-r1-s0"]["round_to"] == 0
    far = trials["l1@depgraph-t1000.00-r1-s0"]
    assert far["target_speedup"] == 1000 and not far["target_speedup_reached"] and len(far["speedup_probes"]) == 4
    near = trials["l1@depgraph-t1.20-r1-s0"]
    assert near["target_speedup_reached"] and near["target_speedup_where"] == "eager-b16"
    _, rep = report_of(study, "--only", "summary")
    text = (rep / "summary.md").read_text()
    assert "### l1@depgraph r8" in text and "### l1@depgraph r1" in text  # never pooled across roundings
    assert "l1@depgraph-t1000.00-r1-s0 did not reach its 1000x speedup target in eager-b16" in text
