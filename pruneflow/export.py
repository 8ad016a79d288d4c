"""``python -m pruneflow.export --ckpt FILE_OR_DIR --format onnx [--batch N | --dynamic-batch]``: deployable files.

Writes ``<checkpoint>.onnx`` beside each safetensors checkpoint (never a pickle: nothing in the file is run) and
checks ONNX Runtime's outputs against torch's on a real batch of the checkpoint's data set (random images of the
right shape when that data set is not staged here). The largest absolute difference is printed and stored in the
ONNX file's metadata (``pruneflow.max_abs_diff``), beside the checkpoint's own metadata.
"""

import json
import os
import sys

from .cli import run_cli
from .errors import UserError, check_above, check_flag, check_whole

FORMATS = ("onnx",)


def export(ckpt, format="onnx", batch=1, dynamic_batch=False, atol=1e-4, data_root=None, out=None):
    """Export pruneflow checkpoints for deployment and check the exported graph against torch.

    Args:
      ckpt: a .safetensors checkpoint, or a directory whose *.safetensors are all exported.
      format: onnx (the one format for now; TensorRT and CoreML build from it).
      batch: the batch size the graph is exported for (and checked at).
      dynamic_batch: export with a free batch dimension instead (checked at --batch and at one more size).
      atol: the largest absolute difference in logits allowed between ONNX Runtime and torch (fp32).
      data_root: where mnist / cifar10 are staged, for the real batch the check runs (digits needs none).
      out: the .onnx path (one checkpoint only; default: beside it).
    """
    from .infer import checkpoint as ckpt_io
    from .infer.runtimes import RuntimeUnavailable, providers_for

    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    dynamic_batch = check_flag(dynamic_batch, "dynamic_batch")
    batch, atol = check_whole(batch, "--batch", 1), check_above(atol, "--atol", 0)
    files = _checkpoints(os.fspath(ckpt))
    if out is not None and len(files) > 1:
        raise UserError("--out names one file: export a directory without it (each .onnx goes beside its checkpoint)")
    try:
        providers_for("cpu")  # the check needs onnxruntime: say so before any export
    except RuntimeUnavailable as e:
        raise UserError(str(e)) from None
    metas = {f: ckpt_io.read_meta(f) for f in files}  # every file validated before any is exported
    rows = []
    for f in files:
        target = out or os.path.splitext(f)[0] + ".onnx"
        rows.append(export_one(f, metas[f], target, batch, dynamic_batch, data_root))
        r = rows[-1]
        print(f"{os.path.basename(f)} -> {r['onnx']}  ({r['exporter']} exporter, opset {r['opset']}, "
              f"batch {'dynamic' if dynamic_batch else batch}); ONNX Runtime vs torch on {r['input']}: "
              f"max |diff| {r['max_abs_diff']:.2e}")
    worst = max(rows, key=lambda r: r["max_abs_diff"])
    if worst["max_abs_diff"] > atol:
        raise UserError(f"{worst['onnx']}: ONNX Runtime's logits differ from torch's by {worst['max_abs_diff']:.2e} "
                        f"(> --atol {atol:g}); the file is written but should not be deployed as is")
    return None


def export_one(path, meta, target, batch, dynamic_batch, data_root):
    """Export one checkpoint to ``target`` and check it: {onnx, exporter, opset, max_abs_diff, input}."""
    import numpy as np
    import onnx
    import torch

    from .infer import checkpoint as ckpt_io
    from .infer.runtimes import RuntimeUnavailable, export_onnx, session

    model, meta = ckpt_io.load(path)
    model.eval()
    x, source = example_batch(meta, batch + (1 if dynamic_batch else 0), data_root)
    try:
        exporter, opset = export_onnx(model, x[:batch], target, dynamic_batch)
    except RuntimeUnavailable as e:
        raise UserError(f"{path}: {e}") from None
    sess, _ = session(target, "cpu")
    sizes = [batch, batch + 1] if dynamic_batch else [batch]  # a free batch dimension is checked at two sizes
    diff = 0.0
    with torch.inference_mode():
        for n in sizes:
            want = model(x[:n]).numpy()
            got = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x[:n].numpy())})[0]
            diff = max(diff, float(np.abs(got - want).max()))
    m = onnx.load(target)
    for k, v in {"pruneflow.max_abs_diff": f"{diff:.3e}", "pruneflow.checked_on": source,
                 "pruneflow.checkpoint": os.path.basename(path),
                 "pruneflow.meta": json.dumps({k: meta[k] for k in ("arch", "dataset", "input_shape", "num_classes",
                                                                  "method", "sparsity", "arm") if k in meta})}.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(m, target)
    return dict(onnx=target, exporter=exporter, opset=opset, max_abs_diff=diff, input=source)


def example_batch(meta, n, data_root=None):
    """(n images as the model sees them, where they came from): the data set's first test images, normalised as
    pruneflow.infer feeds them, else seeded random ones of the checkpoint's input shape."""
    import torch

    from .infer.data import Batches, load_split

    try:
        images, labels = load_split(meta["dataset"], "test", data_root)
        xb, _ = next(iter(Batches(images[:n], labels[:n], meta["dataset"], n, torch.device("cpu"))))
        if xb.shape[0] == n:
            return xb.float().contiguous(), f"{n} {meta['dataset']} test images"
    except (UserError, KeyError):
        pass  # not staged here: the check still runs, on random inputs
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *meta["input_shape"], generator=g), f"{n} random inputs ({meta['dataset']} not staged)"


def _checkpoints(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise UserError(f"no *.safetensors checkpoints in directory {path}")
        return files
    if not os.path.exists(path):
        raise UserError(f"no such checkpoint: {path}")
    if not path.endswith(".safetensors"):
        raise UserError(f"{path} is not a .safetensors checkpoint (export reads no pickles; "
                        "python -m pruneflow.convert turns a torch.save file into one)")
    return [path]


def main():
    run_cli(export, name="pruneflow.export")


if __name__ == "__main__":
    sys.exit(main())
