"""The runtimes a model is deployed with, each behind one interface: ``prepare(runtime, model, batch)`` returns a
Runner whose ``call()`` runs one forward pass of that batch, ready to be timed by ``timing.time_calls_paired``.

- ``eager``: the model as PyTorch runs it, one kernel launch per op (what pruneflow timed before issue 30).
- ``compiled``: ``torch.compile``. On CUDA a CUDA-graph mode (reduce-overhead or max-autotune; ``auto`` times both
  and keeps the faster), since launch overhead, not arithmetic, sets a pruned network's eager time on a GPU. On
  the CPU, Inductor's default mode.
- ``onnxruntime``: the model exported to ONNX and run in an ONNX Runtime session whose execution provider
  follows the device (CUDA or TensorRT where ``onnxruntime-gpu`` has them, CoreML on macOS, CPU otherwise).

Preparing (compiling, exporting, building the session) is timed apart from the calls. A runtime that cannot run
a model raises RuntimeUnavailable with a one-line reason; the caller records it for that runtime and goes on.
"""

import dataclasses
import os
import tempfile
import time
import typing

RUNTIMES = ("eager", "compiled", "onnxruntime")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ONNX_EXTRA = "pip install 'pruneflow[onnx]'"


class RuntimeUnavailable(Exception):
    """This runtime cannot run this model here; the message says why in one line."""


@dataclasses.dataclass
class Runner:
    runtime: str
    call: typing.Callable[[], object]  # one forward pass of the prepared batch; returns the output
    prepare_s: float = 0.0  # seconds compiling / exporting / building the session, not in any timed call
    provider: str = ""  # onnxruntime: the execution provider that ran; else the torch device type
    mode: str = ""  # compiled: the torch.compile mode kept; onnxruntime: the exporter (dynamo | torchscript)
    opset: int = 0  # onnxruntime: the ONNX opset of the exported graph
    cleanup: typing.Callable[[], None] = lambda: None


def check_runtime(name):
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}")
    return name


def prepare(runtime, model, batch, compile_mode="auto", threads=None, workdir=None):
    """A Runner of ``model`` (eval mode, on ``batch``'s device) in ``runtime`` for ``batch``; raises
    RuntimeUnavailable when the runtime cannot run it here."""
    import torch

    check_runtime(runtime)
    model.eval()
    t0 = time.perf_counter()
    if runtime == "eager":
        def call():
            with torch.inference_mode():
                return model(batch)

        return Runner("eager", call, provider=batch.device.type)
    if runtime == "compiled":
        return _compiled(model, batch, compile_mode, t0)
    return _onnxruntime(model, batch, threads, workdir, t0)


def _compiled(model, batch, mode, t0):
    import torch

    from .device import synchronize
    from .timing import time_calls

    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; valid: {', '.join(COMPILE_MODES)}")
    cuda = batch.device.type == "cuda"
    # CUDA graphs replay a whole forward as one launch; on the CPU there is nothing to replay
    modes = (["reduce-overhead", "max-autotune"] if cuda else ["default"]) if mode == "auto" else [mode]
    best = None
    for m in modes:
        try:
            fn = torch.compile(model, mode=None if m == "default" else m, dynamic=False)
            with torch.inference_mode():
                for _ in range(3):  # compile, then CUDA-graph recording and a first replay
                    fn(batch)
            synchronize(batch.device)
        except Exception as e:  # Dynamo/Inductor failures come as many types; the runtime alone fails
            if len(modes) == 1:
                raise RuntimeUnavailable(f"torch.compile(mode={m}) failed: {_one_line(e)}") from None
            continue
        if len(modes) > 1:  # auto: a few timed calls decide which mode this model deploys with
            with torch.inference_mode():
                t = sorted(time_calls(lambda: fn(batch), batch.device, warmup=2, trials=7))[3]
            if best is None or t < best[1]:
                best = (m, t, fn)
        else:
            best = (m, 0.0, fn)
    if best is None:
        raise RuntimeUnavailable(f"torch.compile failed in every mode tried ({', '.join(modes)})")
    m, _, fn = best
    graphs = cuda and m in ("reduce-overhead", "max-autotune")

    def call():
        if graphs:  # each call a new step: CUDA-graph trees may then reuse the previous call's output memory
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            return fn(batch)

    return Runner("compiled", call, prepare_s=time.perf_counter() - t0, provider=batch.device.type, mode=m)


def providers_for(device_type):
    """ONNX Runtime execution providers for a torch device type, best first, of those installed here."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable(f"onnxruntime is not installed ({ONNX_EXTRA})") from None
    have = ort.get_available_providers()
    wanted = {"cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
              "mps": ["CoreMLExecutionProvider"], "cpu": ["CPUExecutionProvider"]}[device_type]
    chosen = [p for p in wanted if p in have]
    if not chosen:
        hint = "pip install onnxruntime-gpu" if device_type == "cuda" else "an onnxruntime build with CoreML"
        raise RuntimeUnavailable(f"onnxruntime here has no provider for {device_type} ({', '.join(have)}; {hint})")
    return chosen


def export_onnx(model, example, path, dynamic_batch=False):
    """Export ``model`` (eval, on the CPU) to ``path`` for inputs shaped like ``example``: the dynamo exporter,
    else the TorchScript one. Returns (exporter, opset). Raises RuntimeUnavailable with the reason."""
    import torch

    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise RuntimeUnavailable(f"ONNX export needs {e.name} ({ONNX_EXTRA})") from None
    model.eval()
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            _export(torch, model, example, path, exporter, dynamic_batch)
            return exporter, int(max(o.version for o in onnx.load(path, load_external_data=False).opset_import
                                     if o.domain in ("", "ai.onnx")))
        except Exception as e:  # each exporter fails in its own ways; the next one is tried
            errors.append(f"{exporter}: {_one_line(e)}")
    raise RuntimeUnavailable("ONNX export failed (" + "; ".join(errors) + ")")


def _export(torch, model, example, path, exporter, dynamic_batch):
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' progress and deprecation chatter
        if exporter == "dynamo":
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
            prog = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, input_names=["x"],
                                     output_names=["logits"], verbose=False, external_data=False)
            prog.save(path)
        else:
            axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes=axes)


def session(path, device_type="cpu", threads=None):
    """An ONNX Runtime InferenceSession of ``path`` on the providers for ``device_type``: (session, provider)."""
    import onnxruntime as ort

    providers = providers_for(device_type)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:  # the study's timing threads, as torch's are set: the runtimes compare at equal threads
        opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
    sess = ort.InferenceSession(path, opts, providers=providers + ["CPUExecutionProvider"] * (device_type != "cpu"))
    return sess, sess.get_providers()[0]


def _onnxruntime(model, batch, threads, workdir, t0):
    import copy

    import numpy as np
    import torch

    providers_for(batch.device.type)  # no provider for this device: say so before spending time on the export
    tmp = tempfile.mkdtemp(prefix="pruneflow-onnx-", dir=workdir)
    path = os.path.join(tmp, "model.onnx")
    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float()
    example = batch.detach().to("cpu", memory_format=torch.contiguous_format).float()
    exporter, opset = export_onnx(cpu_model, example, path)
    sess, provider = session(path, batch.device.type, threads)
    name = sess.get_inputs()[0].name
    if provider == "CPUExecutionProvider":
        x = np.ascontiguousarray(example.numpy())

        def call():
            return sess.run(None, {name: x})[0]
    else:  # the input stays on the GPU: bound in place, as a server would feed it
        binding = sess.io_binding()
        x = batch.detach().contiguous().float()
        binding.bind_input(name, x.device.type, x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(sess.get_outputs()[0].name, x.device.type, x.device.index or 0)

        def call(keep=x):  # keep: the bound input must outlive the session's use of its pointer
            sess.run_with_iobinding(binding)
            return binding

    def cleanup():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    return Runner("onnxruntime", call, prepare_s=time.perf_counter() - t0, provider=provider, mode=exporter,
                  opset=opset, cleanup=cleanup)


def _one_line(e):
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
