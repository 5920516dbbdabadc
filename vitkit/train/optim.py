"""AdamW with the usual split: 2-D weights decay; norms, biases and tokens do not. Layer-wise lr decay for fine-tuning.

The split follows nanoGPT's `configure_optimizers` and timm: a parameter decays iff it is at least 2-D and its
name is not in `model.no_weight_decay()` (position embedding, cls / register tokens, MAP latent).
"""

from __future__ import annotations

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def wants_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    """True for matrices and conv kernels; False for norms, biases, LayerScale gammas and tokens in `skip`."""
    return param.ndim >= 2 and name not in skip and name.split(".")[-1] not in skip


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: {"params": decayed, "weight_decay": wd} and {"params": rest, "weight_decay": 0}."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if wants_decay(name, p, skip) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def vit_layer_id(name: str, num_blocks: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, everything after L + 1."""
    if name.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Param groups whose `lr_scale` is layer_decay ** (L + 1 - depth): the head learns at full lr, the
    embeddings at layer_decay ** (L + 1) of it (BEiT / MAE fine-tuning). Decay split as in `param_groups`.
    """
    skip = _no_decay_names(model)
    num_blocks = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = vit_layer_id(name, num_blocks)
        decays = wants_decay(name, p, skip)
        g = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": layer_decay ** (num_blocks + 1 - layer),
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    layer_decay: float | None = None,
    impl: str = "auto",
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (or `layer_decay_param_groups` when layer_decay is set).

    impl: "fused" (one kernel per step; fastest on CPU for ViT-sized parameter lists), "foreach" (multi-tensor),
    "loop" (per-parameter, the reference), or "auto" = fused.
    """
    if layer_decay is not None and layer_decay != 1.0:
        groups = layer_decay_param_groups(model, weight_decay, layer_decay)
    else:
        groups = param_groups(model, weight_decay)
    impl = "fused" if impl == "auto" else impl
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    if impl not in ("fused", "foreach", "loop"):
        raise ValueError(f"optimizer impl must be auto, fused, foreach or loop, got {impl!r}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kw)
