"""Iterative pruning on a ramp and distillation from the dense model (issue 31, parts 3 and 4)."""

import math

import pytest
import torch

from conftest import assert_clean_error, run_module
from pruneflow.results import read_trials
from pruneflow.schedule import ramp, split_epochs
from pruneflow.step import distill_loss


def test_distill_loss_is_the_stated_mix_on_fixed_logits():
    s, t, y, alpha, T = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2, 0.3, 2.0

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    ce = -math.log(softmax(s)[y])
    ps, pt = softmax([v / T for v in s]), softmax([v / T for v in t])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    want = alpha * ce + (1 - alpha) * T * T * kl  # by hand: 0.3 x 0.4076 + 0.7 x 4 x 0.3200 (KL = 0.32 x ln e)
    got = distill_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), alpha, T)
    assert got.item() == pytest.approx(want, rel=1e-6) and want == pytest.approx(1.0187, abs=1e-3)
    same = distill_loss(torch.tensor([s]), torch.tensor([s]), torch.tensor([y]), 0.0, T)
    assert same.item() == pytest.approx(0.0, abs=1e-7)  # a student equal to its teacher has nothing to learn


def test_ramps_end_at_the_target_and_epochs_sum_to_the_budget():
    assert ramp(0.5, 3, "linear") == pytest.approx([1 / 6, 1 / 3, 0.5], abs=1e-6)  # rounded to 6 places
    agp = ramp(0.5, 3, "agp")  # Zhu & Gupta: s (1 - (1 - k/N)^3)
    assert agp == pytest.approx([0.5 * (1 - (2 / 3) ** 3), 0.5 * (1 - (1 / 3) ** 3), 0.5], abs=1e-6)
    assert agp[0] > 0.5 / 3  # large steps first
    assert split_epochs(4, 3) == [2, 1, 1] and split_epochs(2, 3) == [1, 1, 0] and sum(split_epochs(20, 3)) == 20


def test_an_iterative_distilled_study_records_its_rounds_and_teacher(dense_ckpt, tmp_path):
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, "--seeds", "[0]", "--dense",
                   dense_ckpt, "--prune.methods", "[l1@depgraph, level]", "--prune.sparsities", "[0.5]",
                   "--finetune.epochs", 3, "--latency.trials", 3, "--noprogress", "--prune.schedule", "iterative",
                   "--prune.steps", 3, "--finetune.distill", "{alpha: 0.5, temperature: 4}")
    assert p.returncode == 0, p.stdout + p.stderr
    trials = {r["id"]: r for r in read_trials(tmp_path / "quickstart" / "shard-0-of-1.h5")}
    control = trials["control-s0"]
    assert control["distill_teacher"] == "dense.safetensors" and control["distill_alpha"] == 0.5  # fair control
    assert not trials["dense-s0"].get("distill_teacher")
    for tid in ("l1@depgraph-0.50-s0", "level-0.50-s0"):
        r = trials[tid]
        points = r["prune_points"]
        assert [pt["round"] for pt in points] == [1, 2, 3] and points[-1]["sparsity"] == pytest.approx(0.5)
        assert sum(pt["epochs"] for pt in points) == len(r["epochs"]) == len(control["epochs"]) == 3
        assert r["schedule"] == "iterative agp x3" and r["distill_teacher"] == "dense.safetensors"
        assert all(len(pt["widths"]) == 4 for pt in points)  # conv1, conv2, fc1, fc2 after each round
    l1 = trials["l1@depgraph-0.50-s0"]["prune_points"]
    assert l1[0]["macs"] > l1[1]["macs"] > l1[2]["macs"] and abs(l1[-1]["channel_sparsity"] - 0.5) < 0.05
    assert trials["level-0.50-s0"]["weight_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("override, needle", [
    (["--prune.schedule", "gradual"], "prune.schedule 'gradual' is not valid"),
    (["--prune.ramp", "cubic"], "prune.ramp 'cubic' is not valid"),
    (["--prune.steps", "0"], "prune.steps must be >= 1"),
    (["--prune.schedule", "iterative", "--prune.mac_targets", "[2]"], "MAC and speedup targets search one-shot"),
    (["--finetune.distill", "{alpha: 2}"], "finetune.distill: alpha must be in [0, 1]"),
    (["--finetune.distill", "{alpha: 0.5, temp: 4}"], "unknown key 'temp' in finetune.distill"),
])
def test_bad_schedule_and_distill_settings_are_one_line(tmp_path, override, needle):
    assert_clean_error(run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, *override), needle)
