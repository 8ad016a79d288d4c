import os
import pickle

import pytest
import torch

from pruneflow.infer import checkpoint as ckpt_io
from pruneflow.errors import UserError
from pruneflow.prune import prune


def test_round_trip_reproduces_logits(dense_ckpt, tmp_path):
    model, meta = ckpt_io.load(dense_ckpt)
    pruned, stats = prune(model, "l2", 0.7, meta["input_shape"], ("Conv2d", "Linear"), ("fc2",))
    path = tmp_path / "p.safetensors"
    ckpt_io.save(pruned, path, dict(meta, method="l2", sparsity=0.7))
    loaded, lmeta = ckpt_io.load(path)
    assert lmeta["method"] == "l2" and lmeta["format"] == ckpt_io.FORMAT
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert (loaded(x) - pruned.eval()(x)).abs().max().item() <= 1e-5


def test_loading_never_unpickles(tmp_path):
    evil = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, evil)
    with pytest.raises(UserError, match="pickle"):
        ckpt_io.load(evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="pickle"):
        ckpt_io.load(raw)


def test_bad_checkpoints(dense_ckpt, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ckpt_io.load(tmp_path / "missing.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(open(dense_ckpt, "rb").read()[: os.path.getsize(dense_ckpt) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ckpt_io.load(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(UserError):
        ckpt_io.load(text)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="without pruneflow metadata"):
        ckpt_io.load(foreign)


def test_checkpoint_of_another_architecture(dense_ckpt, tmp_path):
    model, meta = ckpt_io.load(dense_ckpt)
    lying = tmp_path / "lying.safetensors"
    ckpt_io.save(model, lying, dict(meta, arch="resnet18", in_channels=1))
    with pytest.raises(UserError, match="do not match its declared architecture 'resnet18'"):
        ckpt_io.load(lying)


def test_convert_a_pickled_pruned_model(dense_ckpt, tmp_path):
    """The seed saved whole pruned modules with torch.save; convert turns one into a portable checkpoint."""
    from conftest import assert_clean_error, run_module

    model, meta = ckpt_io.load(dense_ckpt)
    pruned, _ = prune(model, "l1", 0.5, meta["input_shape"], ("Conv2d", "Linear"), ("fc2",))
    torch.save(pruned, tmp_path / "seed.pt")
    out = tmp_path / "seed.safetensors"
    args = ["--src", tmp_path / "seed.pt", "--out", out, "--model", "simple_cnn", "--dataset", "digits", "--method",
            "l1", "--sparsity", 0.5]
    # a whole module loads only by running code from the file: refused unless the user says they trust it
    assert_clean_error(run_module("pruneflow.convert", *args), "holds pickled Python objects", "--trust-pickle")
    assert not out.exists()
    p = run_module("pruneflow.convert", *args, "--trust-pickle")
    assert p.returncode == 0, p.stderr
    loaded, lmeta = ckpt_io.load(out)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert (loaded(x) - pruned.eval()(x)).abs().max().item() <= 1e-5
    assert lmeta["method"] == "l1"


def test_header_length_starting_with_0x80_is_not_mistaken_for_a_pickle(dense_ckpt, tmp_path):
    """A safetensors file starts with its header length; ~1 in 32 lengths begin with byte 0x80, the pickle
    protocol marker. Those are valid checkpoints and must load."""
    model, meta = ckpt_io.load(dense_ckpt)
    hits = 0
    for pad in range(256):  # the header is padded to 8 bytes: 32 of these lengths end in byte 0x80
        path = tmp_path / "p.safetensors"
        ckpt_io.save(model, path, dict(meta, pad="x" * pad))
        if path.read_bytes()[:1] == b"\x80":
            hits += 1
            ckpt_io.load(path)  # must not raise "is a pickle"
            break
    assert hits > 0


class _Planted:
    """A pickle that runs code when loaded (what a hostile .pt file does): it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_convert_never_runs_code_from_a_file_it_was_not_told_to_trust(tmp_path):
    from conftest import assert_clean_error, run_module

    marker, src = tmp_path / "ran", tmp_path / "hostile.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Planted(str(marker))}, src)
    p = run_module("pruneflow.convert", "--src", src, "--out", tmp_path / "x.safetensors", "--model", "simple_cnn",
                   "--dataset", "digits")
    assert_clean_error(p, "holds pickled Python objects", "--trust-pickle")
    assert not marker.exists()  # refused before anything in the file ran
