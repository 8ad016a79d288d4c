"""Training and fine-tuning: ``fit`` and ``evaluate``, the 2022 report's recipes by name, and the train CLI.

``python -m pruneflow.train --model simple_cnn --dataset digits --epochs 5 --out results/demo/dense.safetensors``
trains a dense model; ``--init CKPT`` fine-tunes an existing (pruned) checkpoint instead.
"""

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from .errors import UserError, check_flag, check_whole
from .files import atomic, write_text
from .infer.vit import VIT_ARCHS, vit_config
from .step import autocast, make_step, resolve_perf

# The 2022 report's recipes. lr is per batch of `batch_size` images; milestones are fractions of the epochs.
RECIPES = {
    # MNIST (PyTorch's classic example, which the 2022 report followed): Adadelta, lr decays 0.7x per epoch.
    "mnist": dict(optimizer="adadelta", lr=1.0, momentum=0.0, weight_decay=0.0, schedule="step", gamma=0.7, batch_size=64),
    # CIFAR-10 ResNet (seed: 180 epochs): SGD, lr /10 at 50 % and 75 % of training.
    "cifar_resnet": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="multistep", gamma=0.1,
                         milestones=(0.5, 0.75), batch_size=64),
    # Torch-Pruning's CIFAR benchmark recipe (benchmarks/main.py --mode pretrain: 200 epochs, lr /10 at 120, 150
    # and 180), by which DepGraph (CVPR 2023) reports ResNet-56 at 93.53 % on CIFAR-10.
    "cifar_depgraph": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="multistep", gamma=0.1,
                           milestones=(0.6, 0.75, 0.9), batch_size=128),
    # and its fine-tuning after pruning (--mode prune: 100 epochs, lr 0.01, /10 at 60 and 80)
    "finetune_depgraph": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="multistep",
                              gamma=0.1, milestones=(0.6, 0.8), batch_size=128),
    # ViTs from scratch on CIFAR (DeiT's optimiser, Touvron et al. 2021, at CIFAR's batch size): AdamW, lr 1e-3
    # per 128 images, weight decay 0.05, cosine to 0. SGD, the CNN recipes' optimiser, trains ViTs poorly.
    "vit_adamw": dict(optimizer="adamw", lr=1e-3, momentum=0.0, weight_decay=0.05, schedule="cosine", batch_size=128),
    # and its fine-tuning after pruning: a tenth of the lr
    "finetune_vit": dict(optimizer="adamw", lr=1e-4, momentum=0.0, weight_decay=0.05, schedule="cosine",
                         batch_size=128),
    # Fine-tuning after pruning (seed: 3 epochs MNIST, 20 ResNet): SGD lr 0.01, constant.
    "finetune": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="constant", batch_size=64),
    # Opt-in, not the 2022 report's: fine-tuning at batch 512 with the learning rate scaled linearly (0.01 x 512/64,
    # Goyal et al. 2017). Fewer, larger steps keep a GPU busy without packing; results differ from 'finetune'
    # (compare both before switching a study).
    "finetune_bs512": dict(optimizer="sgd", lr=0.08, momentum=0.9, weight_decay=0.0, schedule="constant", batch_size=512),
    # Opt-in, not the 2022 report's: 'finetune' with the lr decaying along a cosine to 0 (docs/methods.md: a
    # constant 0.01 restarts training at 10x the dense model's final lr and ends the fine-tune still noisy).
    "finetune_cosine": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="cosine", batch_size=64),
}


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf: the trial fails (and may be retried) instead of writing garbage."""


def get_recipe(name, **overrides):
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    recipe = dict(RECIPES[name], name=name)
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    return recipe


def default_recipe(arch):
    return "mnist" if arch == "simple_cnn" else "vit_adamw" if arch in VIT_ARCHS else "cifar_resnet"


def make_optimizer(model, recipe, epochs, perf=None):
    """(optimiser, scheduler) for ``recipe``, the scheduler stepped once per epoch; capturable when ``perf`` (a
    step.Perf) records whole steps as CUDA graphs."""
    params = list(model.parameters())
    if recipe["optimizer"] == "adadelta":
        opt = torch.optim.Adadelta(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                                   capturable=bool(perf and perf.records_graph))
    elif recipe["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                                capturable=bool(perf and perf.records_graph))
    else:
        opt = torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"])
    if recipe["schedule"] == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=recipe["gamma"])
    elif recipe["schedule"] == "cosine":  # epoch e trains at the cosine's value at its midpoint: ends near 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * (e + 0.5) / epochs)))
    elif recipe["schedule"] == "multistep":
        milestones = sorted({max(1, round(f * epochs)) for f in recipe["milestones"]})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=recipe["gamma"])
    else:  # constant: a schedule without milestones keeps the state_dict layout of the others
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [], gamma=1.0)
    return opt, sched


def train_one_epoch(model, batches, step, progress=False, desc="", check_every=50):
    """One pass over ``batches`` through ``step`` (step.make_step's); returns (mean loss, accuracy). The sums
    stay on the device and are read once per ``check_every`` steps, so the CPU never waits for the GPU per step."""
    model.train()
    sums, seen = None, 0
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc=desc, leave=False, unit="batch")
    for i, (x, y) in enumerate(it, 1):
        if sums is None:
            sums = step.reset_sums(x.device)
        step(x, y)
        seen += len(y)
        if i % check_every == 0:
            _check_finite(sums[0])
    if sums is None:
        raise ValueError("train_one_epoch: no batches")
    _check_finite(sums[0])
    return sums[0].item() / seen, sums[1].item() / seen


def _check_finite(total_loss):
    # a NaN/inf loss anywhere makes the running sum non-finite, so checking the sum finds it
    if not torch.isfinite(total_loss):
        raise TrainingDiverged(f"loss became {total_loss.item()} during training")


@torch.no_grad()
def evaluate(model, batches, amp_dtype=None, predictions=False):
    """(mean loss, accuracy) without augmentation, in eval mode; with ``predictions``, (loss, accuracy, the
    predicted class of every image in order, uint8 on the CPU): the report's paired tests need them."""
    model.eval()
    total_loss = correct = 0
    seen, preds = 0, []
    for x, y in batches:
        with autocast(x.device.type, amp_dtype):
            out = model(x)
        total_loss = total_loss + F.cross_entropy(out.float(), y, reduction="sum")  # summed on the device
        hit = out.argmax(1)
        correct = correct + (hit == y).sum()
        seen += len(y)
        if predictions:
            preds.append(hit)
    if predictions:
        return float(total_loss) / seen, int(correct) / seen, torch.cat(preds).to("cpu", torch.uint8)
    return float(total_loss) / seen, int(correct) / seen


def fit(model, train_batches, val_batches, recipe, epochs, perf, masks=None, progress=False, on_epoch=None,
        resume=None, loss_fn=None):
    """Train for ``epochs`` with the step ``perf`` (a step.Perf) asks for, scoring ``val_batches`` after each;
    returns the per-epoch history.

    ``on_epoch(epoch, history, model, opt, sched)`` runs after each epoch (checkpointing for requeue);
    ``resume`` is a state dict written from such a callback ({epoch, history, model, optimizer, scheduler}).
    """
    opt, sched = make_optimizer(model, recipe, epochs, perf)
    step = make_step(model, opt, perf, masks, loss_fn)  # the module keeps the weights: evaluation sees no wrapper
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
        train_loss, train_acc = train_one_epoch(model, train_batches, step, progress, f"epoch {epoch + 1}/{epochs}")
        val_loss, val_acc = evaluate(model, val_batches, perf.amp_dtype)
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
    """No more torch threads than the CPUs Slurm gave the job (cluster.job_cpus): torch starts one per core
    it may run on, which where Slurm does not bind CPUs is the whole node, other jobs' cores included."""
    from .cluster import job_cpus

    torch.set_num_threads(max(1, min(torch.get_num_threads(), job_cpus())))


def model_meta(arch, dataset, stem, num_classes, vit=None):
    """The checkpoint metadata that describes how to rebuild and feed a model (``vit``: a ViT's size)."""
    from .data import dataset_info

    info = dataset_info(dataset)
    size = {"vit": vit_config(vit)} if arch in VIT_ARCHS else {}
    return dict(arch=arch, dataset=dataset, stem=stem, num_classes=num_classes, in_channels=info["shape"][0],
                input_shape=list(info["shape"]), mean=list(info["mean"]), std=list(info["std"]),
                method="none", sparsity=0.0, **size)


def train_dense(arch, dataset, out, epochs, recipe=None, stem="cifar", seed=0, device="auto", data_root=None,
                download=False, progress=True, batch_size=None, lr=None, config=None, perf=None, val=None, vit=None):
    """Train a dense model on train (``val`` = (size, seed) of the held-out carve) and write its checkpoint;
    resumable (Slurm requeue) through ``OUT.resume.pt``. Returns (checkpoint path, history)."""
    from .data import dataset_info, eval_batches, split_info
    from .infer import checkpoint as ckpt_io
    from .infer.device import resolve_device
    from .errors import check_writable_file
    from .models import build_model

    out = check_writable_file(out)
    info = dataset_info(dataset)
    recipe = get_recipe(recipe or default_recipe(arch), batch_size=batch_size, lr=lr)
    dev = resolve_device(device)
    keep_threads_to_job()
    seed_everything(seed)
    model = build_model(arch, num_classes=info["classes"], in_channels=info["shape"][0], stem=stem,
                        image_size=info["shape"][-1], vit=vit)
    model, train_b, val_b, p = prepare(model, dataset, recipe, seed, dev, data_root, download, perf, val)
    meta = dict(model_meta(arch, dataset, stem, info["classes"], vit), seed=seed, recipe=recipe, epochs=epochs,
                config=config or {}, val_split=split_info(dataset, data_root, download, val))
    state_path = out + ".resume.pt"
    resume = _read_resume(state_path, meta, dev)
    if resume is not None and progress:
        print(f"resuming dense training from epoch {resume['epoch']} ({state_path})")

    def save_state(epoch, history, model, opt, sched):
        # a file object, not a path: torch's own writer would hide a full disk's errno
        with atomic(state_path) as tmp, open(tmp, "wb") as f:
            torch.save(dict(epoch=epoch, history=history, model=model.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), meta=json.dumps(meta, sort_keys=True)), f)

    history = fit(model, train_b, val_b, recipe, epochs, p, progress=progress, on_epoch=save_state, resume=resume)
    # test is scored once, at the end, and stored: nothing in training looks at it
    _, test_acc = evaluate(model, eval_batches(dataset, "test", dev, data_root, val, p.channels_last), p.amp_dtype)
    meta.update(accuracy=history[-1]["val_acc"] if history else None, test_accuracy=test_acc, history=history)
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
             progress=False, batch_size=None, lr=None, perf=None, teacher=None, distill=None):
    """Fine-tune a (pruned) model in place on the train split its dense model trained on (``meta``'s carve);
    unstructured zeros stay zero. With ``teacher`` and ``distill`` (a spec.DistillSpec) the loss distils the
    teacher's logits into it (step.Distill). Returns the history (val_* on the val split)."""
    from .infer.device import resolve_device
    from .prune import zero_masks

    recipe = get_recipe(recipe, batch_size=batch_size, lr=lr)
    dev = resolve_device(device)
    seed_everything(seed)
    model, train_b, val_b, p = prepare(model, meta["dataset"], recipe, seed, dev, data_root, download, perf,
                                       meta_carve(meta))
    masks = zero_masks(model) if meta.get("method") == "level" else None
    if epochs == 0:
        loss, acc = evaluate(model, val_b, p.amp_dtype)
        return [dict(epoch=0, train_loss=math.nan, train_acc=math.nan, val_loss=loss, val_acc=acc, lr=0.0, seconds=0.0)]
    loss_fn = None if distill is None else distiller(teacher, distill, dev, p)
    return fit(model, train_b, val_b, recipe, epochs, p, masks=masks, progress=progress, loss_fn=loss_fn)


def distiller(teacher, distill, device, perf):
    """step.Distill from ``teacher`` (moved to ``device`` in ``perf``'s layout) with a spec.DistillSpec's
    weights. Fine-tuning and the GPU memory probe both use it: the teacher is part of what a trial occupies."""
    from .step import Distill

    teacher.to(device)
    if perf.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return Distill(teacher, distill.alpha, distill.temperature)


def meta_carve(meta):
    """(size, seed) of the val carve a checkpoint's dense model trained without; None (the data set's default
    carve) for checkpoints from before carves were recorded."""
    v = meta.get("val_split") or {}
    return (v["size"], v["seed"]) if "size" in v else None


def prepare(model, dataset, recipe, seed, device, data_root=None, download=False, perf=None, val=None):
    """(model, train batches, val batches, step.Perf) ready to train on ``device``: the model moved there in
    the layout ``perf`` (a spec.PerformanceSpec) resolves to, the data set's batches in the same layout. Dense
    training, fine-tuning and the sweep's GPU memory probe all start here."""
    from .data import train_val_batches

    p = resolve_perf(perf, device)
    model.to(device)
    if p.channels_last:
        model.to(memory_format=torch.channels_last)
    train_b, val_b = train_val_batches(dataset, recipe["batch_size"], device, seed, data_root, download,
                                       p.channels_last, p.loader, val)
    return model, train_b, val_b, p


def cli(out, model="simple_cnn", dataset="digits", epochs=5, recipe=None, stem="cifar", init=None, seed=0,
        device="auto", data_root=None, download=False, batch_size=None, lr=None, val_size=None, val_seed=0,
        progress=True):
    """Train a dense model, or fine-tune a checkpoint (--init), and write a portable checkpoint.

    Args:
      out: output checkpoint (.safetensors); per-epoch metrics are stored in its metadata and OUT.json.
      model: simple_cnn | resnet18 | resnet34 | resnet50 | resnet101 | resnet152 (torchvision) | resnet20 |
        resnet32 | resnet56 | resnet110 (He et al.'s CIFAR ResNets) | vgg16_bn | vgg19_bn | mobilenet_v2.
      dataset: digits (embedded, offline) | mnist | cifar10 | cifar100 | synthetic-* (random images).
      epochs: training epochs.
      recipe: mnist | cifar_resnet | cifar_depgraph | finetune | finetune_depgraph | ... (default: the 2022
        report's for the model; finetune with --init).
      stem: cifar (3x3 conv, no pool) | imagenet (torchvision's 7x7/2 + max-pool, as the 2022 report) — ResNets only.
      init: fine-tune this checkpoint instead of training from scratch (pruned zeros stay zero).
      seed: random seed (recorded in the checkpoint).
      device: auto | cpu | cuda | mps.
      data_root: where mnist / cifar10 are staged.
      download: download the data set if missing (needs internet).
      batch_size: override the recipe's batch size.
      lr: override the recipe's learning rate.
      val_size: images held out of the training part as val (a count, or a fraction; default 5000 for
        mnist/cifar10, 0.1 for digits). Fine-tuning (--init) keeps the carve its checkpoint records.
      val_seed: seed of that carve.
      progress: a bar per epoch and a line after it (--noprogress for batch-job logs: the last line only).
    """
    from .infer import checkpoint as ckpt_io
    from .cluster import keep_to_slurm_gpus
    from .errors import check_not_input, check_writable_file
    from .models import ARCHITECTURES

    keep_to_slurm_gpus(device, override="pass --device cuda")  # a Slurm job given no GPUs trains on the CPU
    epochs = check_whole(epochs, "epochs", 0 if init else 1)
    seed = check_whole(seed, "seed", 0)
    if batch_size is not None:
        batch_size = check_whole(batch_size, "batch size", 1)
    if lr is not None:
        lr = _positive(lr, "learning rate")
    download = check_flag(download, "download")
    progress = check_flag(progress, "progress")
    if init is None:
        if model not in ARCHITECTURES:
            raise UserError(f"unknown model {model!r}; valid models: {', '.join(ARCHITECTURES)}")
        carve = None if val_size is None else (_positive(val_size, "val size"), check_whole(val_seed, "val seed", 0))
        path, history = train_dense(model, dataset, out, epochs, recipe, stem, seed, device, data_root, download,
                                    progress=progress, batch_size=batch_size, lr=lr, val=carve)
    else:
        path = check_writable_file(out)
        check_not_input(init, path, "fine-tuned model")
        net, meta = ckpt_io.load(init)
        keep_threads_to_job()  # train_dense does it itself
        history = finetune(net, meta, epochs, recipe or "finetune", seed, device, data_root, download, progress,
                           batch_size, lr)
        ckpt_io.save(net, path, dict(meta, accuracy=history[-1]["val_acc"], finetune_epochs=epochs, history=history))
    write_text(path + ".json", json.dumps(history, indent=1))
    last = history[-1]
    test = "" if init is not None else f", test {100 * ckpt_io.read_meta(path)['test_accuracy']:.2f} %"
    print(f"val accuracy {100 * last['val_acc']:.2f} %{test} after {epochs} epoch(s); wrote {path} "
          f"(+ {os.path.basename(path)}.json)")


def _positive(v, what):
    # Fire passes numbers as int/float and anything else as it came ('abc'); True is an int in Python
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise UserError(f"{what} must be a positive number, got {v!r}")
    return float(v)


def main():
    from .cli import run_cli

    run_cli(cli, name="pruneflow.train")


if __name__ == "__main__":
    main()
