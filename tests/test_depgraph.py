"""Pruning that reaches its nominal sparsity: the DepGraph backend, target-MACs mode, dependency-aware NNI."""
import re

import pytest
import torch

from conftest import assert_clean_error, run_module
from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.errors import UserError
from pruneflow.models import build_model
from pruneflow.prune import BACKENDS, parse_method, prune, prune_to_mac_reduction, pruned_meta
from pruneflow.results import read_trials
from pruneflow.train import finetune, model_meta

DEPGRAPH = [f"{m}@depgraph" for m in BACKENDS["depgraph"]]


def calibration(shape):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g))]


@pytest.mark.parametrize("method", DEPGRAPH)
def test_every_depgraph_method_on_resnet18_round_trips(tmp_path, method):
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, "cifar").eval()
    pruned, stats = prune(model, method, 0.5, (3, 32, 32), ("Conv2d",), ("fc",), calibration=calibration((3, 32, 32)))
    assert stats["backend"] == "depgraph" and stats["channel_sparsity"] >= 0.45
    assert stats["mac_reduction"] > 3.0  # residual groups pruned together: ~4x at 0.5, not NNI's ~2x
    path = tmp_path / "p.safetensors"
    ckpt_io.save(pruned, path, pruned_meta(model_meta("resnet18", "cifar10", "cifar", 10), stats))
    loaded, meta = ckpt_io.load(path)  # pruneflow.infer's loader
    assert meta["backend"] == "depgraph"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - pruned(x)).abs().max().item() == 0.0


@pytest.mark.parametrize("method", [m for m in DEPGRAPH if not m.startswith("slim")])
def test_depgraph_methods_fine_tune(dense_ckpt, method):
    model, meta = ckpt_io.load(dense_ckpt)
    pruned, stats = prune(model, method, 0.5, meta["input_shape"], ("Conv2d", "Linear"), ("fc2",),
                          calibration=calibration((1, 28, 28)))
    history = finetune(pruned, pruned_meta(meta, stats), epochs=1, device="cpu")
    assert len(history) == 1 and history[-1]["val_acc"] > 0.5


def test_slim_without_batchnorm_says_why(dense_ckpt):
    model, meta = ckpt_io.load(dense_ckpt)
    with pytest.raises(UserError, match="needs BatchNorm"):
        prune(model, "slim@depgraph", 0.5, meta["input_shape"], ("Conv2d",), ())


@pytest.mark.parametrize("method, target", [("l1@depgraph", 2.0), ("l2", 3.0)])
def test_target_macs_mode_lands_within_5_percent(method, target):
    torch.manual_seed(0)
    model = build_model("simple_cnn", 10, 1)
    pruned, stats = prune_to_mac_reduction(model, method, target, (1, 28, 28), op_types=("Conv2d", "Linear"),
                                           exclude=("fc2",))
    assert abs(stats["mac_reduction"] / target - 1) <= 0.05
    assert stats["target_mac_reduction"] == target and 0 < stats["sparsity"] < 1


def test_dependency_aware_nni_reaches_nominal_on_resnet18():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, "cifar").eval()
    _, stats = prune(model, "l1", 0.5, (3, 32, 32), ("Conv2d",), ("fc",), dependency_aware=True)
    assert stats["channel_sparsity"] >= 0.45


def group_structure(config):
    """The layers of each config entry, the entry's settings, and its group as a number in order of first
    appearance (NNI names groups by random uuids)."""
    ids, out = {}, []
    for entry in config:
        entry = dict(entry)
        gid = entry.pop("dependency_group_id", None)
        out.append((entry.pop("op_names"), None if gid is None else ids.setdefault(gid, len(ids)), entry))
    return out


@pytest.mark.parametrize("arch, stem, exclude", [("resnet18", "cifar", ()), ("resnet50", "imagenet", ("conv1",)),
                                                  ("simple_cnn", "cifar", ())])
def test_dependency_groups_equal_nnis_own(arch, stem, exclude):
    # pruneflow traces the model once, unchecked; NNI's function traces it twice, each time checked
    from nni.compression.utils import auto_set_denpendency_group_ids

    from pruneflow.prune import dependency_groups

    in_channels = 1 if arch == "simple_cnn" else 3
    model = build_model(arch, 10, in_channels, stem).eval()
    example = torch.rand(2, in_channels, 28, 28)
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "exclude_op_names": list(exclude)}]
    ours = group_structure(dependency_groups(model, config, example))
    assert ours == group_structure(auto_set_denpendency_group_ids(model, config, example))
    layers = [names for names, _, _ in ours]
    assert len(layers) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) - len(exclude)
    if arch != "simple_cnn":  # residual additions couple layers: fewer groups than layers
        assert len({g for _, g, _ in ours}) < len(layers)
    assert model.training is False


def test_nni_speedup_without_its_mask_statistics_gives_the_same_model(caplog):
    # not verbose, ModelSpeedup's log lines (and the mask statistics they format) are skipped
    from nni.compression.speedup import model_speedup

    model = build_model("resnet18", 10, 3, "cifar").eval()
    formatter = model_speedup.sparsity_stats
    quiet, _ = prune(model, "l2", 0.3, (3, 32, 32), ("Conv2d",), ("fc",), dependency_aware=True)
    assert model_speedup.sparsity_stats is formatter  # put back afterwards
    logged, _ = prune(model, "l2", 0.3, (3, 32, 32), ("Conv2d",), ("fc",), dependency_aware=True, verbose=True)
    assert "output mask:" in caplog.text  # verbose: ModelSpeedup's log, with the statistics
    a, b = quiet.state_dict(), logged.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["layer1.0.conv1.weight"].shape[0] < 64  # channels were removed


def test_rounding_keeps_a_multiple_and_never_rounds_a_layer_to_nothing():
    from pruneflow.depgraph import kept_rounded

    assert kept_rounded(8, 16, 8) == 8  # already a multiple
    assert kept_rounded(10, 32, 8) == 16  # 22 kept -> 16
    assert kept_rounded(14, 16, 8) == 8  # 2 kept would round to 0: keep one multiple
    assert kept_rounded(3, 4, 8) == 0  # a layer narrower than the multiple stays whole


def test_round_to_prunes_more_at_a_higher_sparsity():
    # Torch-Pruning alone left SimpleCNN whole at 0.9 with round_to 8 (every kept count rounded to 0)
    import torch.nn as nn

    model = build_model("simple_cnn", 10, 1)
    widths, reached = {}, []
    for s in (0.3, 0.5, 0.7, 0.9):
        pruned, stats = prune(model, "l1@depgraph", s, (1, 28, 28), op_types=("Conv2d", "Linear"),
                              exclude=("fc2",), round_to=8)
        widths[s] = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in pruned.modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
        reached.append(stats["channel_sparsity"])
    assert all(w % 8 == 0 for ws in widths.values() for w in ws), widths
    assert reached == sorted(reached) and reached[-1] > 0.75, (reached, widths)


def test_unknown_backend_method_combination_lists_valid_ones(dense_ckpt, tmp_path):
    for label in ("taylor", "level@depgraph", "l1@torchprune"):
        with pytest.raises(UserError, match=r"valid: level, l1, l2, fpgm \(nni\); l1@depgraph"):
            parse_method(label)
    assert_clean_error(run_module("pruneflow.prune", "--ckpt", dense_ckpt, "--method", "taylor", "--sparsity", 0.5,
                                  "--out", tmp_path / "x.safetensors"), "unknown pruning method/backend", "depgraph")


def test_prune_cli_target_macs(dense_ckpt, tmp_path):
    p = run_module("pruneflow.prune", "--ckpt", dense_ckpt, "--method", "fpgm@depgraph", "--target-macs", 2,
                   "--out", tmp_path / "t.safetensors", "--noprint_model")
    assert p.returncode == 0, p.stderr
    assert "target: 2x fewer MACs" in p.stdout
    assert re.search(r"^pruning took [\d.]+ s$", p.stdout, re.M), p.stdout  # DepGraph: no NNI parts
    meta = ckpt_io.read_meta(tmp_path / "t.safetensors")
    assert meta["target_mac_reduction"] == 2.0 and abs(meta["mac_reduction"] / 2 - 1) <= 0.05


def test_one_sweep_mixes_backends_and_target_mode(tmp_path, dense_ckpt):
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--seeds", "[0]", "--out", tmp_path, "--dense", dense_ckpt,
                   "--prune.methods", "[l1, l1@depgraph, taylor@depgraph]", "--prune.sparsities", "[0.5]",
                   "--prune.mac_targets", "[2]", "--finetune.epochs", 1, "--latency.trials", 3, "--noprogress")
    assert p.returncode == 0, p.stdout + p.stderr
    records = {r["id"]: r for r in read_trials(tmp_path / "quickstart" / "shard-0-of-1.h5")}
    assert set(records) == {"dense-s0", "control-s0", "l1-0.50-s0", "l1@depgraph-0.50-s0", "taylor@depgraph-0.50-s0",
                            "l1-x2.00-s0", "l1@depgraph-x2.00-s0", "taylor@depgraph-x2.00-s0"}
    assert all(r["status"] == "done" for r in records.values())
    assert records["l1-0.50-s0"]["backend"] == "nni" and records["l1@depgraph-0.50-s0"]["backend"] == "depgraph"
    for tid in ("l1-x2.00-s0", "l1@depgraph-x2.00-s0"):
        assert abs(records[tid]["mac_reduction"] / 2 - 1) <= 0.05 and records[tid]["target_mac_reduction"] == 2.0
