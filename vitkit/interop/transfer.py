"""Getting a pretrained encoder ready for a new task: new head, optional new image size, optional frozen backbone.

The encoder is general-purpose: swap the head and the same encoding serves a new task. The new head starts at
zero (so the first steps do not push noise back into the pretrained encoder); a new image size resamples the
position embedding; `freeze_backbone=True` trains only the head (a linear probe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model import VisionTransformer


def prepare_for_transfer(
    source: str | Path | VisionTransformer,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    freeze_backbone: bool = False,
    labels: list[str] | None = None,
    strict: bool = True,
    **overrides: Any,
) -> VisionTransformer:
    """Load (or take) a model and give it a fresh zero-initialised head for `num_classes` classes.

    Args:
        source: any checkpoint `from_pretrained` reads, or a model.
        img_size: train at this size; the position embedding is resampled (prefix tokens untouched).
        freeze_backbone: only the head stays trainable (a linear probe on the frozen features).
        labels: class names of the new task.
        **overrides: more `from_pretrained` overrides (drop_path_rate, global_pool, ...).
    """
    from . import apply_overrides, from_pretrained

    if isinstance(source, VisionTransformer):
        model = apply_overrides(source, **({"img_size": img_size} if img_size else {}), **overrides)
    else:
        model = from_pretrained(source, strict=strict, **({"img_size": img_size} if img_size else {}), **overrides)
    model.reset_classifier(num_classes)  # always a new zero head, even for an equal class count
    model.labels = list(labels) if labels is not None and len(labels) == num_classes else None
    if freeze_backbone:
        freeze_all_but_head(model)
    return model


def freeze_all_but_head(model: VisionTransformer) -> list[str]:
    """Linear probe: requires_grad only for the head; returns the names that stay trainable."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
        if p.requires_grad:
            trainable.append(name)
    return trainable


def fit_linear_head(
    head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-4, max_iter: int = 200
) -> float:
    """Linear probe on frozen features: multinomial logistic regression with an L2 penalty, solved by L-BFGS.

    feats (N, D) float, labels (N,) int64. Trains `head` in place (from its current weights); returns the fitted
    head's mean cross-entropy on the training rows (without the penalty). Full-batch L-BFGS needs no learning rate
    and converges in seconds for tens of thousands of rows.
    """
    feats, labels = feats.float(), labels.long()
    params = [head.weight, head.bias]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # its return value is the loss of the first closure call, before any update
    with torch.no_grad():
        return float(F.cross_entropy(head(feats), labels))


__all__ = ["prepare_for_transfer", "freeze_all_but_head", "fit_linear_head"]
