"""Bad checkpoints, bad arguments to infer / convert and an absent device: one clean error line, never a
traceback; saved checkpoints readable by others. Every file here is written by pruneflow itself (or, for tensors
that must not match, by safetensors with pruneflow's own metadata)."""
import json
import os
import stat

import pytest
import torch

from conftest import assert_clean_error, run_module
from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.errors import UserError


def write_with_tensors(path, tensors, meta):
    """A checkpoint whose tensors are exactly ``tensors`` (save() would write the model's own)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={ckpt_io.META_KEY: json.dumps(meta)})
    return path


def test_metadata_of_the_wrong_type_or_contradicting_the_tensors_is_refused(dense_ckpt, tmp_path):
    model, meta = ckpt_io.load(dense_ckpt)  # a 1-channel digits SimpleCNN
    cases = [
        (dict(input_shape="abc"), "input_shape must be [channels, height, width]"),
        (dict(input_shape=[1, 28]), "input_shape must be"),
        (dict(in_channels="1"), "in_channels must be a whole number"),
        (dict(num_classes=0), "num_classes must be a whole number >= 1"),
        (dict(input_shape=[3, 28, 28]), "input_shape [3, 28, 28] has 3 channel(s) but in_channels is 1"),
        # what `convert` once wrote for a digits model with its default --dataset cifar10
        (dict(in_channels=3, input_shape=[3, 32, 32], dataset="cifar10"),
         "conv1 takes 1 input channel(s), but in_channels is 3"),
        (dict(num_classes=7), "fc2 has 10 outputs, but num_classes is 7"),
    ]
    for i, (change, message) in enumerate(cases):
        path = ckpt_io.save(model, tmp_path / f"bad{i}.safetensors", dict(meta, **change))
        with pytest.raises(UserError) as e:
            ckpt_io.load(path)
        assert message in str(e.value) and str(path) in str(e.value), (change, str(e.value))


def test_tensors_not_matching_the_architecture_name_the_first_difference(dense_ckpt, tmp_path):
    model, meta = ckpt_io.load(dense_ckpt)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "conv1.weight"}
    wrong = dict(state, **{"conv1.bias": torch.zeros(5)})
    extra = dict(state, **{"head.weight": torch.zeros(2)})
    for tensors, message in [(missing, "(missing conv1.weight)"),
                             (wrong, "(size mismatch for conv1.bias: [5] in the file, [16] expected)"),
                             (extra, "(unexpected head.weight)")]:
        path = write_with_tensors(tmp_path / "t.safetensors", tensors, ckpt_io.read_meta(dense_ckpt))
        with pytest.raises(UserError, match="declared architecture 'simple_cnn'") as e:
            ckpt_io.load(path)
        assert message in str(e.value), str(e.value)


def test_infer_refuses_a_data_set_of_another_shape_and_unknown_names(dense_ckpt, tmp_path):
    assert_clean_error(run_module("pruneflow.infer", dense_ckpt, "--dataset", "synthetic-cifar10", "--trials", 1),
                       "takes images of shape [1, 28, 28] but synthetic-cifar10 has [3, 32, 32]")
    assert_clean_error(run_module("pruneflow.infer", dense_ckpt, "--dataset", "foo", "--trials", 1),
                       "unknown dataset 'foo'", "digits, mnist, cifar10")
    model, meta = ckpt_io.load(dense_ckpt)
    edited = ckpt_io.save(model, tmp_path / "edited.safetensors", dict(meta, input_shape="abc"))
    assert_clean_error(run_module("pruneflow.infer", edited, "--trials", 1), "edited.safetensors", "input_shape")
    # a height and width the model cannot take, its dataset left out of it: refused by the MACs count's forward
    wide = ckpt_io.save(model, tmp_path / "wide.safetensors", dict(meta, input_shape=[1, 32, 32]))
    assert_clean_error(run_module("pruneflow.infer", wide, "--trials", 1, "--noaccuracy"),
                       "does not take its declared input_shape [1, 32, 32]")


def test_warmup_message_states_the_rule_it_enforces(dense_ckpt):
    assert_clean_error(run_module("pruneflow.infer", dense_ckpt, "--warmup", -1), "warmup must be a whole number >= 0")
    p = run_module("pruneflow.infer", dense_ckpt, "--warmup", 0, "--trials", 1, "--noaccuracy")
    assert p.returncode == 0 and "latency:" in p.stdout, p.stdout + p.stderr


def test_directory_without_a_dense_checkpoint_says_there_are_no_speedups(dense_ckpt, tmp_path):
    model, meta = ckpt_io.load(dense_ckpt)
    ckpt_io.save(model, tmp_path / "a.safetensors", dict(meta, arm="pruned", method="level", sparsity=0.5))
    ckpt_io.save(model, tmp_path / "b.safetensors", dict(meta, arm="pruned", method="level", sparsity=0.7))
    p = run_module("pruneflow.infer", tmp_path, "--trials", 2, "--warmup", 0, "--noaccuracy")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("no dense checkpoint") == 1 and "side by side" not in p.stdout, p.stdout
    doc = json.load(open(tmp_path / "devices" / os.listdir(tmp_path / "devices")[0]))
    assert [r["speedup_vs_dense"] for r in doc["checkpoints"]] == [None, None]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_checkpoints_honour_the_umask(dense_ckpt, tmp_path, umask):
    model, meta = ckpt_io.load(dense_ckpt)
    old = os.umask(umask)
    try:
        path = ckpt_io.save(model, tmp_path / "m.safetensors", meta)
        with open(tmp_path / "plain.txt", "w"):  # what any program's new file gets under this umask
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode), oct(mode)
    assert ckpt_io.load(path)[1]["arch"] == "simple_cnn"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "plain.txt"]  # no temporary file left behind


def test_convert_checks_what_it_records(dense_ckpt, tmp_path):
    model, _ = ckpt_io.load(dense_ckpt)
    src = tmp_path / "sd.pt"
    torch.save(model.state_dict(), src)  # a 1-channel digits model
    out = tmp_path / "out.safetensors"
    assert_clean_error(run_module("pruneflow.convert", src, out, "simple_cnn"),  # --dataset defaults to cifar10
                       "does not fit --dataset cifar10", "conv1 takes 1 input channel(s)", "digits, mnist")
    assert_clean_error(run_module("pruneflow.convert", src, out, "simple_cnn", "--dataset", "digits",
                                  "--sparsity", 1.5), "sparsity", "[0, 1)")
    assert_clean_error(run_module("pruneflow.convert", src, out, "simple_cnn", "--dataset", "digits",
                                  "--method", "foo"), "unknown pruning method", "'foo'", "none")
    assert_clean_error(run_module("pruneflow.convert", dense_ckpt, out, "simple_cnn", "--dataset", "digits"),
                       "already is a portable pruneflow checkpoint")
    assert not out.exists()
    p = run_module("pruneflow.convert", src, out, "simple_cnn", "--dataset", "digits", "--method", "l1",
                   "--sparsity", 0.5)
    assert p.returncode == 0, p.stderr
    meta = ckpt_io.read_meta(out)
    assert (meta["in_channels"], meta["input_shape"], meta["method"], meta["sparsity"]) == (1, [1, 28, 28], "l1", 0.5)


@pytest.mark.parametrize("damage, needle", [
    (lambda b: (2**60).to_bytes(8, "little") + b[8:], "header too large"),  # an absurd header length
    (lambda b: len(b).to_bytes(8, "little") + b[8:], "invalid header length"),  # past the end of the file
    (lambda b: b[:5], "header too small"),
    (lambda b: b[:8] + b"[" + b[9:], "truncated or corrupt"),  # the JSON header is not an object
])
def test_checkpoint_bytes_that_lie_about_their_header_are_one_line(dense_ckpt, tmp_path, damage, needle):
    # read before anything is allocated from the claimed length: no MemoryError, no traceback
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(open(dense_ckpt, "rb").read()))
    with pytest.raises(UserError, match=needle):
        ckpt_io.load(bad)
    if needle == "header too large":  # and the command line's one line (the others take the same path)
        assert_clean_error(run_module("pruneflow.infer", "--ckpt", bad, "--trials", 1, "--noaccuracy"), needle)


def test_an_absent_cuda_device_is_one_line_in_each_command(dense_ckpt, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for args in (["pruneflow.infer", "--ckpt", dense_ckpt, "--device", "cuda", "--trials", 1],
                 ["pruneflow.train", "--out", tmp_path / "d.safetensors", "--device", "cuda"],
                 ["pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, "--resources.device", "cuda"]):
        assert_clean_error(run_module(*args), "device 'cuda' is not available on this machine; available: cpu")
    assert not any(tmp_path.iterdir())
