"""``vit_tiny``: torchvision's VisionTransformer sized for 32x32 images, with attention whose heads can be pruned.

The default size is DeiT-Tiny's (Touvron et al. 2021: width 192, 12 layers, 3 heads of 64, MLP 768) on patches
of 4x4 pixels: 64 tokens and a class token for a 32x32 image, 5.4M parameters. ``model.vit`` in a job file
changes it (the size is stored in the checkpoint). torchvision's encoder blocks attend with
``nn.MultiheadAttention``, whose query/key/value width is tied to the embedding width, so no head can go without
narrowing every layer. Each block here attends with ``Attention``: the same computation (tests compare it with
torchvision's on the same weights) with q, k, v and output projections of its own, so DepGraph removes whole
heads per layer (Torch-Pruning's ``num_heads``) or head dimensions, and the embedding width apart. Per-layer head
counts are stored in the checkpoint metadata (``heads``): a head dimension cannot be told from the tensors.
"""

import torch.nn as nn
import torch.nn.functional as F

VIT_ARCHS = ("vit_tiny",)
VIT_DEFAULT = {"patch": 4, "layers": 12, "heads": 3, "width": 192, "mlp": 768}


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections; called as torchvision's EncoderBlock calls
    ``nn.MultiheadAttention``: ``attention(x, x, x, need_weights=False) -> (output, None)``."""

    def __init__(self, width, heads, head_dim, dropout=0.0):
        super().__init__()
        self.num_heads = heads
        self.q = nn.Linear(width, heads * head_dim)
        self.k = nn.Linear(width, heads * head_dim)
        self.v = nn.Linear(width, heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, width)
        self.dropout = dropout

    def forward(self, query, key=None, value=None, need_weights=False):
        n, t, _ = query.shape

        def split(layer):  # (n, t, heads * d) -> (n, heads, t, d); d follows from the layer's width
            return layer(query).view(n, t, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q), split(self.k), split(self.v),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, -1)), None


def vit_config(raw=None):
    """The full size of a ViT from the stored or configured part of it (None: the default)."""
    cfg = dict(VIT_DEFAULT)
    cfg.update(raw or {})
    return cfg


def config_problem(cfg, image_size):
    """What makes a ViT size unbuildable, or None (checked for job files and for checkpoint metadata)."""
    if not isinstance(cfg, dict) or set(cfg) - set(VIT_DEFAULT):
        return f"vit must be a mapping with keys {', '.join(VIT_DEFAULT)}, got {cfg!r}"
    for key, value in cfg.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return f"vit.{key} must be a whole number >= 1, got {value!r}"
    if cfg["width"] % cfg["heads"]:
        return f"vit.width {cfg['width']} is not a multiple of vit.heads {cfg['heads']}"
    if image_size % cfg["patch"]:
        return f"vit.patch {cfg['patch']} does not divide the image size {image_size}"
    return None


def build_vit(cfg, num_classes=10, in_channels=3, image_size=32):
    from torchvision.models.vision_transformer import VisionTransformer

    c = vit_config(cfg)
    model = VisionTransformer(image_size, c["patch"], c["layers"], c["heads"], c["width"], c["mlp"],
                              num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, c["width"], c["patch"], c["patch"])
    for block in model.encoder.layers:
        block.self_attention = Attention(c["width"], c["heads"], c["width"] // c["heads"])
    return model


def is_vit(model):
    return any(isinstance(m, Attention) for m in model.modules())


def attentions(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


def head_counts(model):
    """Heads per layer, in order: what the checkpoint stores."""
    return [a.num_heads for a in attentions(model)]


def sync_width(model):
    """torchvision's ViT reshapes patches by its ``hidden_dim`` attribute: keep it the embedding's width."""
    model.hidden_dim = model.conv_proj.out_channels


def resize_vit(model, tensors, heads):
    """Shape ``model`` (built at its dense size) as ``tensors``: the embedding's class token and position
    table, LayerNorms, and each attention's head count ``heads`` (the Linear layers resize_to does)."""
    import torch

    for name in ("class_token", "encoder.pos_embedding"):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        stored = tensors.get(name)
        if stored is not None:
            setattr(module, leaf, nn.Parameter(torch.zeros(stored.shape)))
    for name, module in list(model.named_modules()):
        w = tensors.get(f"{name}.weight")
        if isinstance(module, nn.LayerNorm) and w is not None:
            new = nn.LayerNorm(w.shape[0], eps=module.eps)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
    layers = attentions(model)
    if heads is not None:
        if not (isinstance(heads, list) and len(heads) == len(layers)):
            raise ValueError(f"heads {heads!r} must list one head count per layer ({len(layers)} layers)")
        names = [n for n, m in model.named_modules() if isinstance(m, Attention)]
        for name, attention, h in zip(names, layers, heads):
            width = tensors.get(f"{name}.q.weight")
            if not (isinstance(h, int) and h >= 1 and width is not None and width.shape[0] % h == 0):
                raise ValueError(f"{name} has {h!r} heads, which do not divide its "
                                 f"{None if width is None else width.shape[0]} query channels")
            attention.num_heads = h
