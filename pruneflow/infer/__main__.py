"""``python -m pruneflow.infer --ckpt FILE|DIR --device auto|cpu|cuda|mps``: latency and accuracy of checkpoints.

With a directory, every ``*.safetensors`` in it is run and a JSON file (schema: docs/device-json.schema.json) is
written for the report's cross-device figure.
"""

import dataclasses
import datetime
import json
import os
import platform
import socket
import sys

from ..cli import run_cli
from ..errors import UserError, check_flag, check_writable_file
from ..files import write_text

# torch and friends are imported inside the functions: `--help` must answer without loading torch.
JSON_SCHEMA = "pruneflow-device/1"
DTYPES = ("float32", "float16", "bfloat16")


def infer(ckpt, device="auto", batch_size=64, warmup=5, trials=25, dtype="float32", channels_last="auto",
          threads=None, dataset=None, data_root=None, accuracy=True, paired=True, out=None, runtime="eager",
          batch_sizes=None, compile_mode="auto"):
    """Time (and, where the data is present, score) pruneflow checkpoints on this machine.

    Args:
      ckpt: a checkpoint file, or a directory whose *.safetensors are all run (dense included).
      device: auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps.
      batch_size: images per timed forward pass (64 as in the 2022 report; 1 for laptop latency).
      warmup: untimed passes at the exact shape first.
      trials: timed passes (25 as in the 2022 report).
      dtype: float32 | float16 | bfloat16 (where the device supports it).
      channels_last: auto (the NHWC memory format on CUDA and the CPU, NCHW on MPS: as a sweep's trials train
        and are timed, so both measure the same) | true | false.
      threads: torch CPU threads (default: torch's choice).
      dataset: data set for accuracy (default: the checkpoint's own); its images must have the shape the
        checkpoint's input_shape says.
      data_root: where mnist / cifar10 are staged (digits needs none).
      accuracy: measure test accuracy when the data set is available.
      paired: in directory mode, time each checkpoint alternately with the directory's dense one, call by call,
        so that its speedup is measured side by side (drift, throttling and other load slow both alike); it
        doubles the timing. --nopaired times each checkpoint once, the speedup being the ratio of medians.
      out: JSON output path in directory mode (default: DIR/devices/<host>-<device>.json).
      runtime: eager | compiled | onnxruntime, or several with commas (eager,compiled,onnxruntime): each is
        timed at every --batch-sizes, paired with the dense checkpoint in that same runtime (directory mode).
        onnxruntime needs pip install 'pruneflow[onnx]'.
      batch_sizes: batch sizes for the runtimes, e.g. 1,64,256 (default: --batch_size).
      compile_mode: compiled: auto (CUDA: the faster of reduce-overhead and max-autotune; CPU: default) or a
        torch.compile mode.
    """
    import torch

    from . import checkpoint as ckpt_io
    from .data import dataset_info
    from ..cluster import keep_to_slurm_gpus
    from .device import resolve_device

    keep_to_slurm_gpus(device, override="pass --device cuda")  # in a Slurm job given no GPUs, auto times the CPU
    batch_size, warmup, trials = _positive(batch_size, "batch size"), _nonneg(warmup, "warmup"), _positive(trials, "trials")
    accuracy, paired = check_flag(accuracy, "accuracy"), check_flag(paired, "paired")  # 'false' is a true string
    if str(dtype) not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    dev = resolve_device(device)
    if dev.type == "cpu" and dtype == "float16":
        raise UserError("float16 is not supported for CPU inference here; use bfloat16 or float32")
    runtimes, sizes = deploy_settings(runtime, batch_sizes, batch_size, compile_mode, dtype)
    if threads is not None:
        torch.set_num_threads(_positive(threads, "threads"))
    path = os.fspath(ckpt)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise UserError(f"no *.safetensors checkpoints in directory {path}")
        out = check_writable_file(out or os.path.join(path, "devices", f"{socket.gethostname()}-{dev.type}.json"))
    else:
        files = [path]
    metas = {f: ckpt_io.read_meta(f) for f in files}  # validate every file before spending time on any
    if dataset is not None:
        dataset_info(dataset)  # a data set named explicitly must exist; the error lists the valid names
    if accuracy:
        for f, meta in metas.items():
            check_data_fits(f, meta, dataset)
    directory = os.path.isdir(path)
    words = {"auto": None, "true": True, "false": False}  # Fire passes True/False, but `true` as a string
    if isinstance(channels_last, str) and channels_last.lower() in words:
        channels_last = words[channels_last.lower()]
    if channels_last is None:  # auto: pruneflow.step.resolve_perf's default, which the sweep's trials are timed with
        channels_last = dev.type in ("cuda", "cpu")
    elif not isinstance(channels_last, bool):
        raise UserError(f"--channels_last must be auto, true or false, got {channels_last!r}")
    settings = dict(batch_size=batch_size, warmup=warmup, trials=trials, dtype=dtype, channels_last=channels_last)
    if runtimes != ["eager"] or batch_sizes is not None:
        settings.update(runtimes=runtimes, batch_sizes=sizes, compile_mode=compile_mode)
    if dev.type == "cuda":
        # the kernels a sweep's trials are timed with (pruneflow.step.resolve_perf sets both, with the default
        # precision, in the process that then times): cuDNN's autotuned convolutions and TF32 matrix products
        torch.backends.cudnn.benchmark = True
        if dtype == "float32":
            torch.set_float32_matmul_precision("high")
        settings.update(cudnn_benchmark=True, tf32_matmul=dtype == "float32")
    if directory:
        settings["speedup"] = "paired" if paired else "medians"
    references = dense_references(metas, dev, settings) if directory and paired else {}
    rows = [run_one(f, dev, settings, dataset, data_root, accuracy, references) for f in files]
    if len(files) == 1 and not directory:
        print_single(rows[0], dev, settings, accuracy)
        print_deploy(rows)
        return None
    add_speedups(rows)
    print_table(rows, dev, settings)
    print_deploy(rows)
    doc = {"schema": JSON_SCHEMA, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine(dev), "settings": settings, "checkpoints": rows}
    write_text(out, json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return None


def check_data_fits(path, meta, dataset=None):
    """Refuse to score a model on images of another shape (a 1-channel digits model on CIFAR-10), which would
    otherwise stop with a torch traceback after the timing. ``dataset``: the one named with --dataset, else the
    checkpoint's own. Data sets unknown here are left to ``test_accuracy``, which notes there is no accuracy."""
    from .data import DATASETS

    name = dataset or meta["dataset"]
    if name not in DATASETS:
        return
    shape, wanted = list(DATASETS[name]["shape"]), list(meta["input_shape"])
    if shape == wanted:
        return
    if dataset is None:
        raise UserError(f"{path} has inconsistent metadata: input_shape {wanted}, but its dataset {name} has "
                        f"images of shape {shape}")
    raise UserError(f"{path} takes images of shape {wanted} but {name} has {shape}; "
                    "choose a data set of that shape with --dataset (or pass --noaccuracy)")


def arm_of(meta):
    """dense | control | pruned (older checkpoints carry no arm: method 'none' is then the dense model)."""
    return meta.get("arm") or ("dense" if meta.get("method", "none") == "none" else "pruned")


def prepared(path, dev, settings):
    """A checkpoint's model on ``dev`` in the timed dtype and memory format, and its metadata."""
    import torch

    from . import checkpoint as ckpt_io

    model, meta = ckpt_io.load(path)
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    return model.to(device=dev, dtype=getattr(torch, settings["dtype"]), memory_format=memory_format), meta


def dense_references(metas, dev, settings):
    """{architecture key: (path, model)}: the directory's dense checkpoints (per architecture, the first by name;
    ``metas``: {path: metadata}), ready to be timed beside the checkpoints pruned from them."""
    refs = {}
    for f, meta in sorted(metas.items()):
        if arm_of(meta) == "dense" and same_arch_key(meta) not in refs:
            refs[same_arch_key(meta)] = (f, prepared(f, dev, settings)[0])
    return refs


def same_arch_key(meta):
    """Checkpoints compare with a dense one only when pruned from the same architecture and input."""
    return meta["arch"], meta.get("stem"), tuple(meta["input_shape"])


def run_one(path, dev, settings, dataset, data_root, accuracy, references=None):
    import torch

    from . import checkpoint as ckpt_io
    from .timing import paired_speedup, summarize, time_forward, time_forward_paired

    model, meta = prepared(path, dev, settings)
    dtype = getattr(torch, settings["dtype"])
    macs = macs_of(path, model.float(), meta, dev)  # first, as it also checks the model takes its input_shape
    model.to(dtype=dtype)
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    x = torch.randn(settings["batch_size"], *meta["input_shape"], device=dev, dtype=dtype).contiguous(memory_format=memory_format)
    speedup, dense_samples = None, None
    reference = (references or {}).get(same_arch_key(meta))  # the dense checkpoint it was pruned from
    if reference is not None and reference[0] != path:
        samples, dense_samples = time_forward_paired(model, reference[1], x, settings["warmup"], settings["trials"])
        speedup = paired_speedup(samples, dense_samples)
    else:
        samples = time_forward(model, x, settings["warmup"], settings["trials"])
    stats = summarize(samples)
    row = {
        "file": os.path.basename(path), "arch": meta["arch"], "dataset": meta["dataset"],
        "method": meta.get("method", "none"), "sparsity": float(meta.get("sparsity", 0.0)),
        "arm": arm_of(meta),
        "params": ckpt_io.count_params(model), "macs": macs,
        "latency": {**stats, "samples": samples}, "images_per_s": settings["batch_size"] / stats["median"],
        "accuracy": None, "speedup_vs_dense": speedup, "arch_key": same_arch_key(meta),
    }
    if dense_samples is not None:  # the dense checkpoint's samples, taken alternately with this one's
        row["latency_dense_samples"] = dense_samples
    if "runtimes" in settings:  # every runtime x batch, paired with the dense checkpoint in that runtime
        from .deploy import time_deployed

        ref = reference[1] if reference is not None and reference[0] != path else None
        cells = time_deployed(model, ref, meta["input_shape"], dev, settings["runtimes"], settings["batch_sizes"],
                              settings["warmup"], settings["trials"], settings["channels_last"],
                              settings["compile_mode"], torch.get_num_threads(), dtype)
        row["deploy"] = [dataclasses.asdict(c) for c in cells]
    if accuracy:
        row["accuracy"] = test_accuracy(model, dataset or meta["dataset"], data_root, dev, dtype, settings, meta)
    return row


def deploy_settings(runtime, batch_sizes, batch_size, compile_mode, dtype):
    """(runtimes, batch sizes) from --runtime and --batch-sizes, each checked; onnxruntime's packages up front."""
    from ..errors import install_hint, missing_packages
    from .runtimes import COMPILE_MODES, RUNTIMES

    names = [r.strip() for r in (runtime.split(",") if isinstance(runtime, str) else runtime)]
    for r in names:
        if r not in RUNTIMES:
            raise UserError(f"unknown runtime {r!r}; valid: {', '.join(RUNTIMES)} (several with commas)")
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")
    if "onnxruntime" in names:
        missing = missing_packages("onnx", "onnxruntime", "onnxscript")
        if missing:
            raise UserError(install_hint("--runtime onnxruntime", missing))
        if dtype != "float32":
            raise UserError("--runtime onnxruntime runs float32 ONNX exports; use --dtype float32")
    if batch_sizes is None:
        sizes = [batch_size]
    else:
        raw = batch_sizes.split(",") if isinstance(batch_sizes, str) else (
            batch_sizes if isinstance(batch_sizes, (list, tuple)) else [batch_sizes])
        sizes = [_positive(_number(b), "each of --batch-sizes") for b in raw]
    if len(set(names)) < len(names) or len(set(sizes)) < len(sizes):
        raise UserError("--runtime and --batch-sizes must not list anything twice")
    return names, sizes


def _number(v):
    try:
        return int(v) if isinstance(v, str) else v
    except ValueError:
        raise UserError(f"each of --batch-sizes must be a whole number >= 1, got {v!r}") from None


def print_deploy(rows):
    """One line per checkpoint x runtime x batch: median, images/s, the paired speedup and its interval."""
    cells = [(r["file"], c) for r in rows for c in r.get("deploy", [])]
    if not cells:
        return
    print(f"{'runtime':<12} {'batch':>5} {'median ms':>10} {'images/s':>11} {'speedup [95 %]':>20}  "
          f"{'prepare s':>9}  provider / mode  file")
    for f, c in cells:
        if c["status"] != "done":
            print(f"{c['runtime']:<12} {c['batch_size']:>5}  failed: {c['error']}  {f}")
            continue
        sp = (f"{c['speedup']:.2f}x [{c['speedup_lo']:.2f}-{c['speedup_hi']:.2f}]" if c["latency_dense"] else "")
        how = "/".join(x for x in (c["provider"], c["mode"], f"opset {c['opset']}" if c["opset"] else "") if x)
        print(f"{c['runtime']:<12} {c['batch_size']:>5} {1e3 * c['median']:>10.3f} {c['images_per_s']:>11,.0f} "
              f"{sp:>20}  {c['prepare_s']:>9.1f}  {how}  {f}")


def macs_of(path, model, meta, dev):
    """The model's MACs per image, counted in one forward pass; a model that cannot take its declared
    input_shape (an edited height or width) fails here with one line instead of a torch traceback."""
    import torch

    from . import checkpoint as ckpt_io

    try:
        return ckpt_io.count_macs(model, meta["input_shape"], dev)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: the model does not take its declared input_shape {meta['input_shape']} "
                        f"({first})") from None


def test_accuracy(model, dataset, data_root, dev, dtype, settings, meta):
    """Top-1 accuracy on the test split, or None (with a note) when the data is not on this machine."""
    import torch

    from .data import Batches, load_split

    try:
        images, labels = load_split(dataset, "test", data_root)
    except UserError as e:
        print(f"note: no accuracy for {dataset}: {e}", file=sys.stderr)
        return None
    correct = 0
    batches = Batches(images, labels, dataset, settings["batch_size"], dev, channels_last=settings["channels_last"])
    with torch.inference_mode():
        for xb, yb in batches:
            correct += (model(xb.to(dtype)).argmax(1) == yb).sum().item()
    return correct / len(labels)


def add_speedups(rows):
    """The speedups not measured side by side (--nopaired; the dense rows' 1.0): the median of the dense
    checkpoint of the row's architecture over the row's; none where the directory holds no such checkpoint."""
    # the dense baseline: arm 'dense' (the control is also method 'none', but fine-tuned)
    dense = sorted((r for r in rows if r["arm"] == "dense"), key=lambda r: r["file"])
    for r in rows:
        base = next((d for d in dense if d["arch_key"] == r["arch_key"]), None)  # none: another architecture's
        if r["speedup_vs_dense"] is None and base is not None:
            r["speedup_vs_dense"] = base["latency"]["median"] / r["latency"]["median"]
    for r in rows:
        del r["arch_key"]
    rows.sort(key=lambda r: (r["arm"] != "dense", r["arm"] != "control", r["method"], r["sparsity"], r["file"]))


def machine(dev):
    import torch

    from .device import describe

    return {"hostname": socket.gethostname(), "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": dev.type, "device_name": describe(dev),
            "cpu": describe("cpu"), "threads": torch.get_num_threads()}


def print_single(r, dev, settings, accuracy=True):
    from .device import describe

    lat = r["latency"]
    acc = (f"{100 * r['accuracy']:.2f} %" if r["accuracy"] is not None else
           "n/a (data not found)" if accuracy else "not measured (--noaccuracy)")
    layout = "channels_last" if settings["channels_last"] else "NCHW"
    lines = [
        ("model", f"{r['arch']} ({r['dataset']})"), ("method", r["method"]), ("sparsity", f"{r['sparsity']:.2f}"),
        ("params", f"{r['params']:,}"), ("MACs", f"{r['macs']:,}"), ("device", f"{dev} ({describe(dev)})"),
        ("batch size", f"{settings['batch_size']} ({settings['dtype']}, {layout})"),
        ("latency", f"{1e3 * lat['mean']:.3f} ± {1e3 * lat['std']:.3f} ms (median {1e3 * lat['median']:.3f}, "
                    f"p95 {1e3 * lat['p95']:.3f}, n={lat['n']})"),
        ("throughput", f"{r['images_per_s']:,.0f} images/s"), ("test accuracy", acc),
    ]
    for k, v in lines:
        print(f"{k:>13}: {v}")


def print_table(rows, dev, settings):
    from .device import describe

    blank = sum(r["speedup_vs_dense"] is None for r in rows)
    if blank == len(rows):
        how = "none (no dense checkpoint in the directory)"
    else:
        how = ("side by side with the dense checkpoint" if settings.get("speedup") == "paired"
               else "dense median / median")
    print(f"device {dev} ({describe(dev)}), batch {settings['batch_size']}, {settings['dtype']}, "
          f"{'channels_last' if settings['channels_last'] else 'NCHW'}, "
          f"{settings['trials']} timed trials after {settings['warmup']} warm-up; speedup: {how}")
    head = f"{'arm':<8} {'method':<8} {'sparsity':>8} {'params':>12} {'MACs':>14} {'median ms':>10} {'p95 ms':>8} {'speedup':>8} {'acc %':>7}  file"
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = "" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x"
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        print(f"{r['arm']:<8} {r['method']:<8} {r['sparsity']:>8.2f} {r['params']:>12,} {r['macs']:>14,} "
              f"{1e3 * r['latency']['median']:>10.3f} {1e3 * r['latency']['p95']:>8.3f} {sp:>8} {acc:>7}  {r['file']}")
    if 0 < blank < len(rows):
        print(f"no speedup for {blank} checkpoint(s): no dense checkpoint of the same architecture and input shape "
              "in the directory")


def _whole(v, what, least):
    try:
        iv = int(v)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a whole number, got {v!r}") from None
    if iv < least or iv != v:
        raise UserError(f"{what} must be a whole number >= {least}, got {v!r}")
    return iv


def _positive(v, what):
    return _whole(v, what, 1)


def _nonneg(v, what):
    return _whole(v, what, 0)


def main():
    run_cli(infer, name="pruneflow.infer")


if __name__ == "__main__":
    main()
