"""Bad input to the train and prune CLIs: one 'error:' line and exit 2, never a traceback, and nothing lost."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_clean_error, run_module
from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.errors import UserError
from pruneflow.prune import prune


@pytest.mark.parametrize("args, needles", [
    (["--batch_size", 0], ["batch size", ">= 1", "got 0"]),
    (["--batch_size", "abc"], ["batch size", "'abc'"]),
    (["--batch_size", "True"], ["batch size", "got True"]),  # Fire passes a bool, and True is an int
    (["--seed", "abc"], ["seed", "whole number", "'abc'"]),
    (["--lr", "abc"], ["learning rate", "positive number", "'abc'"]),
    (["--lr", -1], ["learning rate", "positive number", "-1"]),
    (["--download", "maybe"], ["download", "true or false", "'maybe'"]),
])
def test_train_refuses_bad_flag_values(tmp_path, args, needles):
    out = tmp_path / "d.safetensors"
    assert_clean_error(run_module("pruneflow.train", out, "--epochs", 1, "--device", "cpu", *args), *needles)
    assert not out.exists()


def test_train_sets_a_corrupt_resume_file_aside_and_starts_over(dense_ckpt, tmp_path):
    out = tmp_path / "t.safetensors"
    resume = tmp_path / "t.safetensors.resume.pt"
    # what a requeued run finds after a bad copy or a full disk: the start of a real state file
    model, _ = ckpt_io.load(dense_ckpt)
    torch.save(dict(epoch=1, history=[], model=model.state_dict()), resume)
    resume.write_bytes(resume.read_bytes()[:1000])
    p = run_module("pruneflow.train", out, "--epochs", 1, "--device", "cpu")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and str(resume) in warnings[0] and "unreadable" in warnings[0], p.stderr
    assert "from scratch" in warnings[0]
    assert out.exists() and not resume.exists()  # trained, and the finished run removed its state as usual
    assert (tmp_path / "t.safetensors.resume.pt.corrupt").stat().st_size == 1000  # kept aside, not deleted


@pytest.mark.parametrize("args, needles", [
    (["l1@depgraph", "--sparsity", 0.5, "--round_to", "abc"], ["round_to", "whole number >= 1", "'abc'"]),
    (["l1@depgraph", "--sparsity", 0.5, "--round_to", 0], ["round_to", ">= 1", "got 0"]),
    (["l1", "--sparsity", 0.5, "--dependency_aware", "maybe"], ["dependency_aware", "true or false"]),
    (["l1", "--target_macs", "abc"], ["target_macs", "number > 1", "'abc'"]),
])
def test_prune_refuses_bad_flag_values(dense_ckpt, tmp_path, args, needles):
    method, *flags = args
    out = tmp_path / "p.safetensors"
    assert_clean_error(run_module("pruneflow.prune", dense_ckpt, method, out, *flags), *needles)
    assert not out.exists()


def test_prune_accepts_flag_words_fire_passes_as_strings(dense_ckpt, tmp_path):
    # Fire gives the string 'false' for --dependency_aware false (True/False only for --flag / --noflag)
    out = tmp_path / "p.safetensors"
    p = run_module("pruneflow.prune", dense_ckpt, "l1@depgraph", out, "--sparsity", 0.5, "--round_to", 4,
                   "--dependency_aware", "false", "--print_model", "false")
    assert p.returncode == 0, p.stderr
    assert "before:" not in p.stdout and out.exists()
    assert ckpt_io.load(out)[0].conv1.out_channels % 4 == 0


def test_prune_refuses_to_exclude_every_layer(dense_ckpt, tmp_path):
    out = tmp_path / "p.safetensors"
    p = run_module("pruneflow.prune", dense_ckpt, "l1", out, "--sparsity", 0.5, "--exclude", "conv1,conv2,fc1,fc2")
    assert_clean_error(p, "nothing left to prune", "Conv2d/Linear", "excluded")
    assert not out.exists()
    # the check sits in prune() itself, so the sweep's trials and the DepGraph backend (which would return the
    # model unpruned) get it too
    model, meta = ckpt_io.load(dense_ckpt)
    with pytest.raises(UserError, match="nothing left to prune"):
        prune(model, "l1@depgraph", 0.5, meta["input_shape"], op_types=("Linear",), exclude=("fc1", "fc2"))


def test_prune_warns_when_mac_target_is_out_of_reach(dense_ckpt, tmp_path):
    out = tmp_path / "p.safetensors"
    p = run_module("pruneflow.prune", dense_ckpt, "l1", out, "--target_macs", 1000, "--noprint_model")
    assert p.returncode == 0 and out.exists(), p.stderr  # the closest try is still written
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: MAC target not met"), p.stderr
    assert "1000x" in lines[0] and f"{ckpt_io.load(out)[1]['mac_reduction']:.2f}x" in lines[0]
    # a reachable target (SimpleCNN reaches 2.51x at sparsity ~0.38) says nothing
    p = run_module("pruneflow.prune", dense_ckpt, "l1", out, "--target_macs", 2.5, "--noprint_model")
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_prune_refuses_to_overwrite_its_input(dense_ckpt, tmp_path):
    ckpt = tmp_path / "dense.safetensors"
    shutil.copy(dense_ckpt, ckpt)
    original = ckpt.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpt)
    for out in (ckpt, link):  # the same file under its own name or another
        p = run_module("pruneflow.prune", ckpt, "l1", out, "--sparsity", 0.5)
        assert_clean_error(p, str(out), "input checkpoint itself")
    assert ckpt.read_bytes() == original


def test_finetune_refuses_to_overwrite_its_input(dense_ckpt, tmp_path):
    ckpt = tmp_path / "pruned.safetensors"
    shutil.copy(dense_ckpt, ckpt)
    original = ckpt.read_bytes()
    p = run_module("pruneflow.train", "--init", ckpt, "--out", ckpt, "--epochs", 1)
    assert_clean_error(p, str(ckpt), "input checkpoint itself")
    assert ckpt.read_bytes() == original


@pytest.mark.parametrize("blocked, args, needles", [
    ("yaml", ["pruneflow.sweep", "jobs/quickstart.yaml"], ["pruneflow.sweep needs pyyaml", "pruneflow[sweep]"]),
    ("ray,psutil", ["pruneflow", "--out", "OUT"], ["pruneflow.sweep needs ray, psutil", "pip install ray psutil"]),
    ("h5py", ["pruneflow.report", "OUT"], ["pruneflow.report needs h5py", "pruneflow[sweep]"]),
    ("submitit", ["pruneflow.submit", "jobs/quickstart.yaml", "--dry-run"], ["needs submitit", "pruneflow[hpc]"]),
    ("submitit", ["pruneflow", "submit", "jobs/quickstart.yaml", "--dry-run"], ["needs submitit", "pruneflow[hpc]"]),
])
def test_a_missing_optional_package_is_one_line_before_any_work(tmp_path, blocked, args, needles):
    # `pip install pruneflow` (inference only) or '[sweep]' without submitit: each command names what to install
    # (these ended in ModuleNotFoundError tracebacks), and the sweep says so before training anything
    code = ("import runpy, sys\n"
            f"for m in {blocked.split(',')!r}: sys.modules[m] = None  # as if not installed\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    args = [str(tmp_path) if a == "OUT" else a for a in args]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_clean_error(p, *needles)
    assert not (tmp_path / "quickstart").exists()  # nothing was started


@pytest.mark.parametrize("missing, clean", [("h5py", True), ("matplotlib.no_such_submodule", False)])
def test_run_cli_names_a_missing_package_but_not_a_missing_submodule(missing, clean):
    # a package not installed is the user's to install (one line); an installed package without a submodule pruneflow
    # imports (another version) is pruneflow's bug, and its traceback must not be disguised as "not installed"
    code = ("import sys\n"
            "sys.modules['h5py'] = None  # as if not installed\n"
            "from pruneflow.cli import run_cli\n"
            f"def command():\n    import {missing}\n"
            "sys.argv = ['command']\n"
            "run_cli(command, name='demo')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if clean:
        assert_clean_error(p, "demo needs h5py, not installed here", "pruneflow[sweep]")
    else:
        assert p.returncode == 1 and "Traceback" in p.stderr and "not installed" not in p.stderr, p.stderr


@pytest.mark.parametrize("args, needles", [
    (["pruneflow.infer", "--ckpt", "CKPT", "--runtimes", "eager"], ["unknown flag --runtimes", "did you mean --runtime?"]),
    (["pruneflow.prune", "CKPT", "l1", "--sparsty", "0.5", "--out", "OUT/p.safetensors"], ["--sparsty", "--sparsity?"]),
    (["pruneflow.train", "--epoch=1", "--out", "OUT/t.safetensors"], ["unknown flag --epoch", "--epochs?"]),
    (["pruneflow.data", "fetch", "cifar10", "--data-rooot", "OUT"], ["unknown flag --data_rooot", "--data_root?"]),
])
def test_a_flag_the_command_does_not_take_is_refused_before_any_work(dense_ckpt, tmp_path, args, needles):
    # Fire says so only after running the command with the flags it knew: infer timed every checkpoint first
    args = [dense_ckpt if a == "CKPT" else a.replace("OUT", str(tmp_path)) for a in args]
    p = run_module(*args, timeout=120)
    assert_clean_error(p, *needles)
    assert p.stdout == "" and list(tmp_path.iterdir()) == []  # nothing timed, trained or written


def test_fire_spellings_of_known_flags_pass_the_check():
    from pruneflow.cli import unknown_flag

    def command(ckpt, batch_sizes=None, progress=True):
        return ckpt, batch_sizes, progress

    for argv in (["--ckpt", "x"], ["--batch-sizes", "1,2"], ["--batch_sizes=1"], ["--noprogress"], ["x", "--", "--y"],
                 ["x", "--progress", "--batch_sizes", "-1"]):
        assert unknown_flag(argv, command) is None, argv
    assert unknown_flag(["--progres"], command) == "unknown flag --progres (did you mean --progress?); --help lists them"
    assert unknown_flag(["--anything"], lambda **kw: kw) is None  # **kwargs: the command checks its own
    assert unknown_flag(["fetch", "--bad"], {"fetch": command}).startswith("unknown flag --bad")


@pytest.mark.parametrize("args, needles", [
    (["--prune.exclude", "[nolayer]"], ["excluded layer(s) ['nolayer'] not in the model", "conv1, conv2, fc1, fc2"]),
    (["--prune.op_types", "[Linear]", "--prune.exclude", "[fc1, fc2]"], ["nothing left to prune", "fc1, fc2"]),
    (["--seeds", "[-1]"], ["seeds: -1 must be a whole number in [0, 2**32)"]),
    (["--latency.runtimes", "[eager, tensorrt]"], ["latency.runtimes: 'tensorrt' is not valid"]),
    (["--latency.runtimes", "[]"], ["latency.runtimes must list at least one runtime"]),
    (["--latency.batch_sizes", "[1, 0]"], ["latency.batch_sizes: 0 must be a whole number >= 1"]),
    (["--latency.batch_sizes", "[8, 8]"], ["latency.batch_sizes lists 8 more than once"]),
    (["--latency.compile_mode", "fast"], ["latency.compile_mode 'fast' is not valid"]),
    (["--latency.target_runtime", "tensorrt"], ["latency.target_runtime 'tensorrt' is not valid"]),
    (["--latency.target_batch", "0"], ["latency.target_batch must be >= 1"]),
    (["--prune.round_to", "[8, 8]"], ["prune.round_to lists one rounding twice"]),
    (["--prune.round_to", "[null, 1]"], ["null and 1 both mean none"]),
    (["--prune.round_to", "[0]"], ["prune.round_to must be >= 1"]),
    (["--prune.speedup_targets", "[1]"], ["prune.speedup_targets: 1.0 must be > 1"]),
    (["--prune.speedup_targets", "[2, 2]"], ["prune.speedup_targets lists 2.0 more than once"]),
])
def test_the_sweep_refuses_a_bad_setting_before_training(tmp_path, args, needles):
    # the selection cases failed in every trial, after the dense model had trained
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, "--noprogress", *args, timeout=120)
    assert_clean_error(p, *needles)
    assert not (tmp_path / "quickstart").exists()
