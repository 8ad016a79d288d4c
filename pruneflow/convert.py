"""Convert a pickled PyTorch model (``torch.save``) into a portable pruneflow checkpoint — on a trusted
machine only, because unpickling can run arbitrary code. That is exactly why ``pruneflow.infer`` refuses
pickles: convert once here, then ship the .safetensors file.

``python -m pruneflow.convert --src model.pt --out model.safetensors --model resnet101 --dataset cifar10``
"""

from .infer.errors import UserError


def cli(src, out, model, dataset="cifar10", stem="imagenet", method="none", sparsity=0.0):
    """Convert a torch.save file (a whole nn.Module, as the seed saved, or a state_dict) to .safetensors.

    Args:
      src: the pickle file (.pt / .pth).
      out: the checkpoint to write (.safetensors).
      model: its architecture: simple_cnn | resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
      dataset: what it was trained on (sets input shape and normalisation): digits | mnist | cifar10.
      stem: ResNet stem: imagenet (torchvision's) | cifar.
      method: the pruning method that produced it, if any (recorded only).
      sparsity: its pruning sparsity, if any (recorded only).
    """
    import torch

    from .infer import checkpoint as ckpt_io
    from .infer.errors import check_writable_file
    from .train import model_meta
    from .data import dataset_info

    out = check_writable_file(out)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)  # trusted input, by this command's contract
    except FileNotFoundError:
        raise UserError(f"{src} does not exist") from None
    except Exception as e:
        raise UserError(f"{src} is not a torch.save file ({type(e).__name__}: {e})") from None
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{src} holds neither an nn.Module nor a state_dict of tensors")
    meta = dict(model_meta(model, dataset, stem, dataset_info(dataset)["classes"]), method=method, sparsity=float(sparsity))
    net = ckpt_io.build_model(model, meta["num_classes"], meta["in_channels"], stem)
    try:
        ckpt_io.resize_to(net, state)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{src} does not match architecture {model!r}: {str(e).splitlines()[0]}") from None
    ckpt_io.save(net, out, meta)
    print(f"wrote {out} ({ckpt_io.count_params(net):,} parameters)")


def main():
    from .infer.errors import run_cli

    run_cli(cli, name="pruneflow.convert")


if __name__ == "__main__":
    main()
