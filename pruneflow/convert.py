"""Convert a PyTorch ``torch.save`` file into a portable pruneflow checkpoint, then ship the .safetensors file
(``pruneflow.infer`` refuses pickles).

A state_dict loads with ``weights_only=True``: tensors and plain containers, no code. A whole pickled
``nn.Module`` (what the 2022 study saved) can only be rebuilt by running code named in the file, so it converts
only with ``--trust-pickle``, for a file whose origin the user trusts.

``python -m pruneflow.convert --src model.pt --out model.safetensors --model resnet101 --dataset cifar10``
"""

from .errors import UserError


def cli(src, out, model, dataset="cifar10", stem="imagenet", method="none", sparsity=0.0, trust_pickle=False):
    """Convert a torch.save file (a whole nn.Module, as the 2022 report saved, or a state_dict) to .safetensors.

    Args:
      src: the pickle file (.pt / .pth); a pruneflow .safetensors file is refused (it needs no conversion).
      out: the checkpoint to write (.safetensors).
      model: its architecture: simple_cnn | resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
      dataset: what it was trained on (sets input shape and normalisation): digits | mnist | cifar10.
      stem: ResNet stem: imagenet (torchvision's) | cifar.
      method: the pruning method that produced it, if any (recorded): none | level | l1 | l2 | fpgm | METHOD@depgraph.
      sparsity: its pruning sparsity, if any (recorded): a fraction in [0, 1).
      trust_pickle: allow a file that holds pickled Python objects (a whole nn.Module): loading it runs code
        from the file, so only for a file whose origin you trust. A state_dict never needs it.
    """
    import torch

    from .infer import checkpoint as ckpt_io
    from .errors import check_writable_file
    from .train import model_meta
    from .data import dataset_info

    from .errors import check_flag

    recorded = pruning_meta(method, sparsity)  # fail before loading anything
    trust_pickle = check_flag(trust_pickle, "trust_pickle")
    out = check_writable_file(out)
    refuse_pruneflow_checkpoint(src)
    try:  # weights_only: tensors and containers only; nothing in the file is run unless the user trusts it
        obj = torch.load(src, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError:
        raise UserError(f"{src} does not exist") from None
    except Exception as e:
        if not trust_pickle and "weights_only" in str(e):
            raise UserError(f"{src} holds pickled Python objects (e.g. a whole nn.Module), which load only by "
                            "running code from the file; if you trust where it came from, re-run with "
                            "--trust-pickle (a state_dict converts without it)") from None
        raise UserError(f"{src} is not a torch.save file ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{src} holds neither an nn.Module nor a state_dict of tensors")
    meta = dict(model_meta(model, dataset, stem, dataset_info(dataset)["classes"]), **recorded)
    net = ckpt_io.build_model(model, meta["num_classes"], meta["in_channels"], stem)
    try:
        ckpt_io.load_tensors(net, state)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{src} does not match architecture {model!r}: {str(e).splitlines()[0]}") from None
    problem = ckpt_io.io_mismatch(net, meta)
    if problem:  # e.g. a 1-channel digits model with the default --dataset cifar10
        raise UserError(f"{src} does not fit --dataset {dataset}: {problem}; pass the data set it was trained on "
                        f"with --dataset{datasets_for(net)}")
    ckpt_io.save(net, out, meta)
    print(f"wrote {out} ({ckpt_io.count_params(net):,} parameters)")


def datasets_for(net):
    """' (1 channel: digits, mnist)': the real data sets whose images the model's first convolution takes."""
    import torch.nn as nn

    from .infer.data import DATASETS, SYNTHETIC

    channels = next((m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    names = [n for n, info in DATASETS.items() if n not in SYNTHETIC and info["shape"][0] == channels]
    return f" ({channels} channel(s): {', '.join(names)})" if names else ""


def pruning_meta(method, sparsity):
    """The method and sparsity to record, checked: they label the checkpoint in every later table."""
    try:
        fraction = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"--sparsity must be a number, got {sparsity!r}") from None
    if not 0 <= fraction < 1:
        raise UserError(f"--sparsity must be a fraction in [0, 1), got {sparsity!r}")
    if method == "none":
        return dict(method="none", sparsity=fraction)
    from .prune import parse_method  # torch only; NNI is imported when pruning, not here

    try:
        parse_method(method)  # 'l1', 'taylor@depgraph', ...: recorded as given
    except UserError as e:
        raise UserError(f"--method: {e}; or none for an unpruned model") from None
    return dict(method=str(method), sparsity=fraction)


def refuse_pruneflow_checkpoint(src):
    """A pruneflow .safetensors file needs no conversion, and converting it would replace its metadata
    (dataset, method, accuracy, config) by this command's defaults. Other safetensors files convert."""
    from safetensors import safe_open

    from .infer.checkpoint import META_KEY

    try:
        with safe_open(src, framework="pt") as f:
            if META_KEY not in (f.metadata() or {}):
                return
    except Exception:  # not safetensors (a pickle, as expected) or not there: torch.load says which
        return
    raise UserError(f"{src} already is a portable pruneflow checkpoint; nothing to convert (use it as it is)")


def main():
    from .cli import run_cli

    run_cli(cli, name="pruneflow.convert")


if __name__ == "__main__":
    main()
