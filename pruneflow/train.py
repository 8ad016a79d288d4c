"""Training and fine-tuning: ``fit`` and ``evaluate``, the seed's recipes by name, and the train CLI.

``python -m pruneflow.train --model simple_cnn --dataset digits --epochs 5 --out results/demo/dense.safetensors``
trains a dense model; ``--init CKPT`` fine-tunes an existing (pruned) checkpoint instead.
"""

import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from .infer.errors import UserError, check_flag, check_whole
from .prune import apply_masks

# The seed's recipes. lr is per batch of `batch_size` images; milestones are fractions of the epochs.
RECIPES = {
    # MNIST (PyTorch's classic example, which the seed followed): Adadelta, lr decays 0.7x per epoch.
    "mnist": dict(optimizer="adadelta", lr=1.0, momentum=0.0, weight_decay=0.0, schedule="step", gamma=0.7, batch_size=64),
    # CIFAR-10 ResNet (seed: 180 epochs): SGD, lr /10 at 50 % and 75 % of training.
    "cifar_resnet": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="multistep", gamma=0.1,
                         milestones=(0.5, 0.75), batch_size=64),
    # Fine-tuning after pruning (seed: 3 epochs MNIST, 20 ResNet): SGD lr 0.01, constant.
    "finetune": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="constant", batch_size=64),
    # Opt-in, not the seed's: fine-tuning at batch 512 with the learning rate scaled linearly (0.01 x 512/64,
    # Goyal et al. 2017). Fewer, larger steps keep a GPU busy without packing; results differ from 'finetune'
    # (compare both before switching a study).
    "finetune_bs512": dict(optimizer="sgd", lr=0.08, momentum=0.9, weight_decay=0.0, schedule="constant", batch_size=512),
}


# How training runs (not what it computes): see resolve_perf. The job file's `performance` section.
DEFAULT_PERF = dict(loader="device", precision="auto", channels_last=None, compile=False)
PRECISIONS = ("auto", "fp32", "bf16")
# torch.compile's modes, and 'cudagraphs'. The CUDA-graph modes (cudagraphs, reduce-overhead) record the whole
# training step as one CUDA graph (GRAPH_MODES, pruneflow.step_graph) and apply on CUDA only: see resolve_perf.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cudagraphs")


def resolve_perf(perf, device):
    """{loader, amp_dtype, channels_last, compile (None or a torch.compile mode)} for ``device``. 'auto'
    precision is fp32 everywhere, with TF32 tensor-core convolutions and matmuls on CUDA: on an H200 at the
    seed's batch 64, bf16 autocast was slower than fp32 for SimpleCNN and ResNet-18 (its casts cost more than
    its faster kernels save at that size; docs/benchmarks.md). bf16 autocast only when asked (large batches).
    channels_last defaults to on for CUDA and the CPU (NHWC convolutions; on the 2-core EPYC CPU also ~3x faster
    batch norm on small maps: docs/benchmarks.md)."""
    perf = dict(DEFAULT_PERF, **{k: v for k, v in (perf or {}).items() if v is not None or k == "channels_last"})
    if perf["precision"] not in PRECISIONS:
        raise UserError(f"unknown precision {perf['precision']!r}; valid: {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    cuda = kind == "cuda"
    bf16 = perf["precision"] == "bf16"
    channels_last = kind in ("cuda", "cpu") if perf["channels_last"] is None else bool(perf["channels_last"])
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
        if perf["precision"] == "auto":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls (cuDNN convolutions use TF32 by default)
    mode = perf["compile"]
    if mode not in (False, True, None, *COMPILE_MODES):
        raise UserError(f"unknown compile mode {mode!r}; valid: true, false, {', '.join(COMPILE_MODES)}")
    mode = "default" if mode is True else mode or None
    if mode in ("cudagraphs", "reduce-overhead") and not cuda:
        # modes for CUDA graphs: off CUDA there is nothing to record, and Inductor's kernels (reduce-overhead's)
        # measured no faster than eager on the CPU (docs/benchmarks.md); a GPU job file that asks for them runs
        # eagerly on a CPU node instead of paying minutes of compilation per trial
        mode = None
    return dict(loader=perf["loader"], amp_dtype=torch.bfloat16 if bf16 else None, channels_last=channels_last,
                compile=mode)


# The modes that record CUDA graphs record the whole training step (pruneflow.step_graph), not only the model:
# 'cudagraphs' around the eager model (no compilation at all), 'reduce-overhead' around Inductor's kernels
GRAPH_MODES = ("cudagraphs", "reduce-overhead")


def step_model_for(model, compile=None):
    """What training steps call instead of ``model`` (None: the module itself), as resolve_perf says: a compiled
    wrapper (compile_model). In the
    CUDA-graph modes the graph replaces TorchDynamo's own: the model eager ('cudagraphs') or compiled by Inductor
    without CUDA graphs ('reduce-overhead'), recorded inside the whole step (steps_for)."""
    if compile in GRAPH_MODES:
        return None if compile == "cudagraphs" else compile_model(model, "default")
    if compile is not None:
        return compile_model(model, compile)
    return None


def steps_for(model, opt, compile=None, masks=None, amp_dtype=None):
    """(step_model, graph) for train_one_epoch: step_model_for's forward and, in the CUDA-graph modes, the
    StepGraph that records whole steps of it with ``opt``, ``masks`` and ``amp_dtype`` (else None)."""
    step_model = step_model_for(model, compile)
    if compile not in GRAPH_MODES:
        return step_model, None
    import functools

    from .step_graph import StepGraph

    forward = model if step_model is None else step_model
    step = functools.partial(train_step, forward, opt, masks=masks, amp_dtype=amp_dtype)
    return step_model, StepGraph(step, opt, next(model.parameters()).device)


def compile_model(model, mode):
    """``model``'s forward through torch.compile for training steps (``mode`` a torch.compile mode, or None:
    no compiling, returns None, the ``step_model`` of uncompiled training; the 'cudagraphs' mode is steps_for's,
    which records whole steps instead). Shapes are
    specialised (dynamic=False): a step whose batch size differs from the first runs eagerly instead
    (train_one_epoch), so an epoch's short last batch costs no second compilation.

    If compiling fails (a node without a working C/C++ compiler, an operator TorchDynamo cannot trace), one line
    says so and the steps run eagerly: compiling changes how fast a trial trains, never what it computes, so a
    study should not lose its trials to it."""
    if mode is None:
        return None
    if mode == "cudagraphs":
        raise ValueError("compile_model: 'cudagraphs' records whole steps: use steps_for")
    fresh_compile_state(model)
    compiled = torch.compile(model, mode=mode, dynamic=False)
    failed = []

    def step(x):
        if failed:
            return model(x)
        try:
            return compiled(x)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            failed.append(e)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"warning: performance.compile {mode!r} failed ({type(e).__name__}: {first}); training eagerly",
                  file=sys.stderr, flush=True)
            return model(x)

    return step


_compiled_shapes = None  # the parameter shapes this process last compiled a model of


def fresh_compile_state(model):
    """Reset TorchDynamo when ``model``'s parameter shapes differ from the last compiled model's in this process.

    Sweep workers are reused across trials. TorchDynamo keeps each compiled model's code in a cache per forward
    function and, past ``recompile_limit`` (8) differently-shaped models, runs the next forward eagerly with
    only a log line: a worker's ninth pruned shape would train uncompiled. The reset also drops earlier trials'
    CUDA-graph trees. A model of the same shapes (the dense, control and level arms) reuses the compiled code
    instead. Returns whether it reset."""
    global _compiled_shapes
    shapes = (type(model), tuple((name, tuple(p.shape)) for name, p in model.named_parameters()))
    reset = _compiled_shapes is not None and shapes != _compiled_shapes
    if reset:
        import torch._dynamo

        torch._dynamo.reset()
    _compiled_shapes = shapes
    return reset


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf: the trial fails (and may be retried) instead of writing garbage."""


def get_recipe(name, **overrides):
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    recipe = dict(RECIPES[name], name=name)
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return recipe


def default_recipe(arch):
    return "mnist" if arch == "simple_cnn" else "cifar_resnet"


def make_optimizer(model, recipe, epochs, compile=None):
    """(optimiser, scheduler) for ``recipe``, the scheduler stepped once per epoch; capturable in the CUDA-graph
    modes (``compile`` in GRAPH_MODES), where StepGraph records the optimiser's step."""
    params = list(model.parameters())
    if recipe["optimizer"] == "adadelta":
        opt = torch.optim.Adadelta(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                                   capturable=compile in GRAPH_MODES)
    else:
        opt = torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"])
    if recipe["schedule"] == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=recipe["gamma"])
    elif recipe["schedule"] == "multistep":
        milestones = sorted({max(1, round(f * epochs)) for f in recipe["milestones"]})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=recipe["gamma"])
    else:  # constant: a schedule without milestones keeps the state_dict layout of the others
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [], gamma=1.0)
    return opt, sched


def autocast(device_type, amp_dtype, cache_enabled=True):
    """torch.autocast to ``amp_dtype``, or nothing when None: torch before 2.5 refuses to create an autocast
    context for 'mps' at all, even a disabled one, and pyproject allows torch 2.2 (the last for Intel Macs)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype, cache_enabled=cache_enabled)


def train_step(forward, opt, x, y, sums, masks=None, amp_dtype=None):
    """One optimiser step on the batch (x, y), gradients None or zero on entry: ``forward`` (the model or what
    step_model_for made of it) and the loss under autocast when ``amp_dtype``, backward, ``opt.step()``,
    ``masks`` (pruned zeros stay zero); the batch's summed loss and correct count are added to ``sums`` (device
    tensors, in place: the same code runs eagerly and recorded in a CUDA graph).

    Autocast's weight cache is off, as torch asks of autocast regions it records in CUDA graphs
    (make_graphed_callables refuses the cache); each weight is cast once per forward here, so it saves nothing."""
    with autocast(x.device.type, amp_dtype, cache_enabled=False):
        out = forward(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
    if masks:
        apply_masks(masks)
    sums[0].add_(loss.detach().float() * len(y))
    sums[1].add_((out.argmax(1) == y).sum())


def train_one_epoch(model, batches, opt, masks=None, progress=False, desc="", amp_dtype=None, step_model=None,
                    check_every=50, graph=None):
    """One pass over ``batches``; returns (mean loss, accuracy). ``masks`` keep pruned zeros at zero;
    ``amp_dtype`` runs forward/loss under autocast; ``step_model`` is what step_model_for made of ``model``, used for
    batches of the first batch's size (a short last batch runs through ``model``: no recompilation); ``graph``
    (steps_for's StepGraph, built with the same optimiser, masks and precision) runs those batches' whole steps.

    Loss and accuracy are summed on the device and read once per ``check_every`` steps: a ``.item()`` per step
    would make the CPU wait for the GPU every step and starve it (the seed's loop did)."""
    model.train()
    sums = None
    seen = full = 0
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc=desc, leave=False, unit="batch")
    for step, (x, y) in enumerate(it, 1):
        if sums is None:  # the graph adds into its own tensors; an eager step adds into the same ones
            sums = graph.zero_sums() if graph is not None else (
                torch.zeros((), device=x.device), torch.zeros((), dtype=torch.long, device=x.device))
        full = full or len(x)
        if graph is not None and len(x) == full:
            graph(x, y)
        else:
            # `is not None`, not truthiness: a compiled module has no truth value
            forward = step_model if step_model is not None and len(x) == full else model
            opt.zero_grad(set_to_none=True)
            train_step(forward, opt, x, y, sums, masks, amp_dtype)
        seen += len(y)
        if step % check_every == 0:
            _check_finite(sums[0])
    if sums is None:
        raise ValueError("train_one_epoch: no batches")
    _check_finite(sums[0])
    return sums[0].item() / seen, sums[1].item() / seen


def _check_finite(total_loss):
    # a NaN/inf loss anywhere makes the running sum non-finite, so checking the sum finds it
    if total_loss is not None and not torch.isfinite(total_loss):
        raise TrainingDiverged(f"loss became {total_loss.item()} during training")


@torch.no_grad()
def evaluate(model, batches, amp_dtype=None, forward=None):
    """(mean loss, accuracy) without augmentation, in eval mode; ``forward`` calls the model (default: itself)."""
    model.eval()
    total_loss = correct = 0
    seen = 0
    for x, y in batches:
        with autocast(x.device.type, amp_dtype):
            out = (forward or model)(x)
        total_loss = total_loss + F.cross_entropy(out.float(), y, reduction="sum")  # summed on the device
        correct = correct + (out.argmax(1) == y).sum()
        seen += len(y)
    return float(total_loss) / seen, int(correct) / seen


def fit(model, train_batches, test_batches, recipe, epochs, masks=None, progress=False, on_epoch=None,
        resume=None, amp_dtype=None, compile=None):
    """Train for ``epochs``; returns the per-epoch history (train/val loss and accuracy, lr, seconds).

    ``on_epoch(epoch, history, model, opt, sched)`` runs after each epoch (checkpointing for requeue);
    ``resume`` is a state dict written from such a callback ({epoch, history, model, optimizer, scheduler}).
    """
    opt, sched = make_optimizer(model, recipe, epochs, compile)
    # torch.compile (``compile``: a mode, as resolve_perf gives it): slower start (seconds to minutes), faster
    # steps; the uncompiled module keeps the weights, so evaluation and saving never see the compiled wrapper.
    # The CUDA-graph modes record whole steps (StepGraph), kept across epochs.
    step_model, graph = steps_for(model, opt, compile, masks, amp_dtype)
    history, start = [], 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        history, start = list(resume["history"]), int(resume["epoch"])
        train_batches.epoch = start  # same shuffling as an uninterrupted run
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(model, train_batches, opt, masks, progress, f"epoch {epoch + 1}/{epochs}",
                                                amp_dtype, step_model, graph=graph)
        val_loss, val_acc = evaluate(model, test_batches, amp_dtype)
        sched.step()
        history.append(dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                            val_acc=val_acc, lr=lr, seconds=time.perf_counter() - t0))
        if progress:
            print(f"epoch {epoch + 1:>3}/{epochs}  train loss {train_loss:.4f} acc {100 * train_acc:6.2f} %  "
                  f"val loss {val_loss:.4f} acc {100 * val_acc:6.2f} %  lr {lr:.4g}  {history[-1]['seconds']:.1f} s",
                  flush=True)
        if on_epoch is not None:
            on_epoch(epoch + 1, history, model, opt, sched)
    return history


def seed_everything(seed):
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def keep_threads_to_job():
    """No more torch threads than the CPUs Slurm gave the job (infer.device.job_cpus): torch starts one per core
    it may run on, which where Slurm does not bind CPUs is the whole node, other jobs' cores included."""
    from .infer.device import job_cpus

    torch.set_num_threads(max(1, min(torch.get_num_threads(), job_cpus())))


def model_meta(arch, dataset, stem, num_classes):
    """The checkpoint metadata that describes how to rebuild and feed a model."""
    from .data import dataset_info

    info = dataset_info(dataset)
    return dict(arch=arch, dataset=dataset, stem=stem, num_classes=num_classes, in_channels=info["shape"][0],
                input_shape=list(info["shape"]), mean=list(info["mean"]), std=list(info["std"]),
                method="none", sparsity=0.0)


def train_dense(arch, dataset, out, epochs, recipe=None, stem="cifar", seed=0, device="auto", data_root=None,
                download=False, progress=True, batch_size=None, lr=None, config=None, perf=None):
    """Train a dense model and write its checkpoint; resumable (Slurm requeue) through ``OUT.resume.pt``.

    Returns (checkpoint path, history).
    """
    from .data import dataset_info, train_test_batches
    from .infer import checkpoint as ckpt_io
    from .infer.device import resolve_device
    from .infer.errors import check_writable_file
    from .models import build_model

    out = check_writable_file(out)
    info = dataset_info(dataset)
    recipe = get_recipe(recipe or default_recipe(arch), batch_size=batch_size, lr=lr)
    dev = resolve_device(device)
    keep_threads_to_job()
    seed_everything(seed)
    p = resolve_perf(perf, dev)
    model = build_model(arch, num_classes=info["classes"], in_channels=info["shape"][0], stem=stem).to(dev)
    if p["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    train_b, test_b = train_test_batches(dataset, recipe["batch_size"], dev, seed, data_root, download,
                                         p["channels_last"], p["loader"])
    meta = dict(model_meta(arch, dataset, stem, info["classes"]), seed=seed, recipe=recipe, epochs=epochs,
                config=config or {})
    state_path = out + ".resume.pt"
    resume = _read_resume(state_path, meta, dev)
    if resume is not None and progress:
        print(f"resuming dense training from epoch {resume['epoch']} ({state_path})")

    def save_state(epoch, history, model, opt, sched):
        tmp = state_path + ".tmp"
        torch.save(dict(epoch=epoch, history=history, model=model.state_dict(), optimizer=opt.state_dict(),
                        scheduler=sched.state_dict(), meta=json.dumps(meta, sort_keys=True)), tmp)
        os.replace(tmp, state_path)

    history = fit(model, train_b, test_b, recipe, epochs, progress=progress, on_epoch=save_state, resume=resume,
                  amp_dtype=p["amp_dtype"], compile=p["compile"])
    meta.update(accuracy=history[-1]["val_acc"] if history else None, history=history)
    ckpt_io.save(model, out, meta)
    if os.path.exists(state_path):
        os.remove(state_path)
    return out, history


def _read_resume(path, meta, device):
    """The state that a requeued run of this same training (``meta``) left in ``path``, or None: start over."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or garbled (a full disk, a bad copy): RuntimeError, UnpicklingError, EOFError...
        # only saved epochs are lost by starting over; the file is kept aside in case someone wants to look at it
        aside = path + ".corrupt"
        os.replace(path, aside)
        print(f"warning: resume file {path} is unreadable ({type(e).__name__}); moved it to {aside}, "
              f"training from scratch", file=sys.stderr, flush=True)
        return None
    if not isinstance(state, dict) or state.get("meta") != json.dumps(meta, sort_keys=True):
        return None  # a different run's state: start over rather than mix
    return state


def finetune(model, meta, epochs, recipe="finetune", seed=0, device="auto", data_root=None, download=False,
             progress=False, batch_size=None, lr=None, perf=None):
    """Fine-tune a (pruned) model in place; unstructured zeros stay zero. Returns the history."""
    from .data import train_test_batches
    from .infer.device import resolve_device
    from .prune import zero_masks

    recipe = get_recipe(recipe, batch_size=batch_size, lr=lr)
    dev = resolve_device(device)
    seed_everything(seed)
    p = resolve_perf(perf, dev)
    model.to(dev)
    if p["channels_last"]:
        model.to(memory_format=torch.channels_last)
    masks = zero_masks(model) if meta.get("method") == "level" else None
    train_b, test_b = train_test_batches(meta["dataset"], recipe["batch_size"], dev, seed, data_root, download,
                                         p["channels_last"], p["loader"])
    if epochs == 0:
        loss, acc = evaluate(model, test_b, p["amp_dtype"])
        return [dict(epoch=0, train_loss=math.nan, train_acc=math.nan, val_loss=loss, val_acc=acc, lr=0.0, seconds=0.0)]
    return fit(model, train_b, test_b, recipe, epochs, masks=masks, progress=progress, amp_dtype=p["amp_dtype"],
               compile=p["compile"])


def cli(out, model="simple_cnn", dataset="digits", epochs=5, recipe=None, stem="cifar", init=None, seed=0,
        device="auto", data_root=None, download=False, batch_size=None, lr=None):
    """Train a dense model, or fine-tune a checkpoint (--init), and write a portable checkpoint.

    Args:
      out: output checkpoint (.safetensors); per-epoch metrics are stored in its metadata and OUT.json.
      model: simple_cnn | resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
      dataset: digits (embedded, offline) | mnist | cifar10.
      epochs: training epochs.
      recipe: mnist | cifar_resnet | finetune (default: the seed's for the model; finetune with --init).
      stem: cifar (3x3 conv, no pool) | imagenet (torchvision's 7x7/2 + max-pool, as the seed) — ResNets only.
      init: fine-tune this checkpoint instead of training from scratch (pruned zeros stay zero).
      seed: random seed (recorded in the checkpoint).
      device: auto | cpu | cuda | mps.
      data_root: where mnist / cifar10 are staged.
      download: download the data set if missing (needs internet).
      batch_size: override the recipe's batch size.
      lr: override the recipe's learning rate.
    """
    from .infer import checkpoint as ckpt_io
    from .infer.device import keep_to_slurm_gpus
    from .infer.errors import check_not_input, check_writable_file
    from .models import ARCHITECTURES

    keep_to_slurm_gpus(device, override="pass --device cuda")  # a Slurm job given no GPUs trains on the CPU
    epochs = check_whole(epochs, "epochs", 0 if init else 1)
    seed = check_whole(seed, "seed", 0)
    if batch_size is not None:
        batch_size = check_whole(batch_size, "batch size", 1)
    if lr is not None:
        lr = _positive(lr, "learning rate")
    download = check_flag(download, "download")
    if init is None:
        if model not in ARCHITECTURES:
            raise UserError(f"unknown model {model!r}; valid models: {', '.join(ARCHITECTURES)}")
        path, history = train_dense(model, dataset, out, epochs, recipe, stem, seed, device, data_root, download,
                                    batch_size=batch_size, lr=lr)
    else:
        path = check_writable_file(out)
        check_not_input(init, path, "fine-tuned model")
        net, meta = ckpt_io.load(init)
        keep_threads_to_job()  # train_dense does it itself
        history = finetune(net, meta, epochs, recipe or "finetune", seed, device, data_root, download, True,
                           batch_size, lr)
        ckpt_io.save(net, path, dict(meta, accuracy=history[-1]["val_acc"], finetune_epochs=epochs, history=history))
    with open(path + ".json", "w") as f:
        json.dump(history, f, indent=1)
    last = history[-1]
    print(f"val accuracy {100 * last['val_acc']:.2f} % after {epochs} epoch(s); wrote {path} (+ {os.path.basename(path)}.json)")


def _positive(v, what):
    # Fire passes numbers as int/float and anything else as it came ('abc'); True is an int in Python
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise UserError(f"{what} must be a positive number, got {v!r}")
    return float(v)


def main():
    from .infer.errors import run_cli

    run_cli(cli, name="pruneflow.train")


if __name__ == "__main__":
    main()
