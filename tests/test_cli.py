"""The command-line entry points as a user runs them: happy paths and one-line errors for bad input."""
import os
import re

import pytest

from conftest import assert_clean_error, run_module


def test_train_on_digits_reaches_90_percent(tmp_path):
    out = tmp_path / "dense.safetensors"
    p = run_module("pruneflow.train", "--out", out, "--model", "simple_cnn", "--dataset", "digits", "--epochs", 4,
                   "--device", "cpu")
    assert p.returncode == 0, p.stderr
    import json

    history = json.load(open(str(out) + ".json"))
    assert len(history) == 4 and history[-1]["val_acc"] >= 0.90
    assert "val accuracy" in p.stdout and "epoch   4/4" in p.stdout  # progress is on by default


def test_train_noprogress_prints_only_its_last_line(tmp_path):
    # batch-job logs: no bars, no per-epoch lines
    p = run_module("pruneflow.train", "--out", tmp_path / "d.safetensors", "--epochs", 2, "--device", "cpu",
                   "--noprogress")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("val accuracy") and "epoch " not in p.stdout, p.stdout
    assert "batch/s" not in p.stderr, p.stderr


def test_prune_cli_prints_before_after(dense_ckpt, tmp_path):
    out = tmp_path / "p.safetensors"
    p = run_module("pruneflow.prune", "--ckpt", dense_ckpt, "--method", "l1", "--sparsity", 0.5, "--out", out)
    assert p.returncode == 0, p.stderr
    assert "params 300,426 -> 75,338" in p.stdout
    assert "conv1" in p.stdout and "16->8" in p.stdout and "4608->2304" in p.stdout
    # where the time went: NNI's import (first use in the process), masks and speed-up, each within the total
    m = re.search(r"pruning took ([\d.]+) s \(NNI: import ([\d.]+) s, masks ([\d.]+) s, speedup ([\d.]+) s\)", p.stdout)
    assert m, p.stdout
    total, *parts = map(float, m.groups())
    assert parts[0] > 0 and sum(parts) <= total + 0.15  # importing NNI takes seconds; the rest may print 0.0
    # print(model) before and after, as in the 2022 report's appendix
    before, after = p.stdout.split("\nbefore:\n")[1].split("\n\nafter:\n")
    assert "(conv1): Conv2d(1, 16, kernel_size=(3, 3)" in before
    assert "(conv1): Conv2d(1, 8, kernel_size=(3, 3)" in after and "in_features=2304, out_features=32" in after
    assert out.exists()


@pytest.mark.parametrize("args, needles", [
    (["--sparsity", 1.5, "--method", "l1"], ["sparsity", "(0, 1)"]),
    (["--sparsity", 0, "--method", "l1"], ["sparsity"]),
    (["--sparsity", 0.5, "--method", "l3"], ["unknown pruning method", "level, l1, l2, fpgm"]),
])
def test_prune_bad_arguments(dense_ckpt, tmp_path, args, needles):
    p = run_module("pruneflow.prune", "--ckpt", dense_ckpt, "--out", tmp_path / "x.safetensors", *args)
    assert_clean_error(p, *needles)


def test_prune_bad_checkpoints_and_outputs(dense_ckpt, tmp_path):
    base = ["--method", "l1", "--sparsity", 0.5]
    assert_clean_error(run_module("pruneflow.prune", "--ckpt", tmp_path / "nope.safetensors",
                                  "--out", tmp_path / "o.safetensors", *base), "does not exist")
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(open(dense_ckpt, "rb").read()[:1000])
    assert_clean_error(run_module("pruneflow.prune", "--ckpt", bad, "--out", tmp_path / "o.safetensors", *base),
                       "truncated or corrupt")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_clean_error(run_module("pruneflow.prune", "--ckpt", dense_ckpt, "--out", blocker / "o.safetensors", *base),
                       "cannot create directory")


@pytest.mark.parametrize("args, needles", [
    (["--model", "resnet7"], ["unknown model", "resnet18"]),
    (["--dataset", "imagenet"], ["unknown dataset", "digits, mnist, cifar10"]),
    (["--dataset", "mnist", "--data-root", "/nonexistent/data"], ["/nonexistent/data", "fetch"]),
    (["--epochs", 0], ["epochs"]),
    (["--device", "tpu"], ["unknown device"]),
])
def test_train_bad_arguments(tmp_path, args, needles):
    p = run_module("pruneflow.train", "--out", tmp_path / "d.safetensors", *args)
    assert_clean_error(p, *needles)


def test_help_documents_every_parameter():
    for module, flags in [("pruneflow.train", ["--out", "--init", "--data_root", "--stem"]),
                          ("pruneflow.prune", ["--method", "--sparsity", "--exclude"]),
                          ("pruneflow.sweep", ["--shard", "--out"]),
                          ("pruneflow.submit", ["--partition", "--report_partition"]),
                          ("pruneflow.infer", ["--device", "--batch_size", "--channels_last", "--dtype"])]:
        p = run_module(module, "--help")
        assert p.returncode == 0, (module, p.returncode)  # sweep's **overrides once made Fire exit 2 for --help
        text = p.stdout + p.stderr
        for f in flags:  # required arguments are listed as positionals (OUT), flags as --name
            assert f in text or f"\n    {f.lstrip('-').upper()}\n" in text, (module, f)


def test_help_anywhere_on_the_line_shows_help_and_runs_nothing(tmp_path):
    # Fire alone ran `sweep JOB --help` into "unknown key 'help'" and timed the checkpoint of `infer CKPT --help`
    for module, args in [("pruneflow.sweep", ["jobs/quickstart.yaml", "--out", tmp_path, "--help"]),
                         ("pruneflow.submit", ["jobs/quickstart.yaml", "-h", "--out", tmp_path]),
                         ("pruneflow.infer", [tmp_path / "none.safetensors", "--help"]),
                         ("pruneflow.data", ["fetch", "--help"])]:
        p = run_module(module, *args)
        assert p.returncode == 0 and "SYNOPSIS" in p.stdout + p.stderr, (module, p.returncode, p.stderr)
    assert list(tmp_path.iterdir()) == []  # no study was started, nothing was written


@pytest.mark.parametrize("visible", ["7,5", None])
def test_local_pipeline_steps_see_the_callers_gpus(tmp_path, monkeypatch, visible):
    # submit --cluster local: submitit's local executor sets CUDA_VISIBLE_DEVICES to the GPUs asked of it (none),
    # which hid a workstation's GPUs from every step; each step must see what the caller sees (here, real
    # submitit jobs reading the variable in their own process)
    import functools

    from pruneflow.submit import local_executor

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    job = local_executor(str(tmp_path / "%j"), minutes=2).submit(functools.partial(os.getenv, "CUDA_VISIBLE_DEVICES"))
    assert job.result() == visible


def test_submit_cluster_local_runs_the_whole_pipeline_here(tmp_path):
    # `submit --cluster local`: dense training -> the shard -> the report through submitit's local executor, each
    # step announced with its log (it was silent for the whole run) and no literal '%j' folder left behind
    p = run_module("pruneflow.submit", "jobs/quickstart.yaml", "--cluster", "local", "--out", tmp_path,
                   "--seeds", "[0]", "--train.epochs", 1, "--finetune.epochs", 1, "--latency.trials", 3,
                   "--prune.methods", "[l1@depgraph]", "--prune.sparsities", "[0.5]")
    assert p.returncode == 0, p.stdout + p.stderr
    steps = re.findall(r"^local: (.+) \(job \d+, log (\S+)\)$", p.stdout, re.M)
    assert [s for s, _ in steps] == ["dense training", "sweep shard 0/1", "report"], p.stdout
    assert all(os.path.exists(log) for _, log in steps)
    study = tmp_path / "quickstart"
    from pruneflow.results import read_trials

    assert sorted(r["id"] for r in read_trials(study / "shard-0-of-1.h5") if r["status"] == "done") == \
        ["control-s0", "dense-s0", "l1@depgraph-0.50-s0"]
    assert (study / "report" / "summary.md").exists()
    assert "%j" not in os.listdir(study / "slurm")
