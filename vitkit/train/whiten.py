"""Patch-whitening initialisation of a conv tokenizer's first layer (airbench: Jordan 2024, cifar10-airbench).

Before training, the first conv's filters are set to the whitening filters of the image patches it will see: with
V, L the eigenvectors and eigenvalues of the covariance of every k×k patch (k×k×C numbers each), filter i is
V[:, i] / sqrt(L[i] + eps), so the layer's outputs start decorrelated with unit variance in every direction of
patch space, however unevenly the raw pixels spread their variance. Each eigenvector goes in twice, +V and -V, so
that the ReLU after the layer passes both signs (airbench's trick); a layer with fewer than 2·k·k·C filters takes
the leading eigenvectors (largest eigenvalues), one with more keeps its other filters as initialised.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

WHITEN_IMAGES = 5000  # airbench's sample: enough for a stable 27x27 covariance, a second or two to compute
WHITEN_EPS = 5e-4  # airbench's: keeps the near-zero eigen-directions (pixel noise) from being blown up
PATCHES_PER_CHUNK = 1 << 20  # patches unfolded at once: ~100 MB for 3x3 RGB patches, whatever the image size


def patch_covariance(batches: Iterable[torch.Tensor], kernel: tuple[int, int]) -> torch.Tensor:
    """Covariance (d, d), d = C·kh·kw, of every kh×kw patch (stride 1, no padding) of float images (B, C, H, W)
    given in batches; float64. The flattening order is a conv weight's (C, kh, kw)."""
    total = mean_sum = None
    count = 0
    for images in batches:
        if images.ndim != 4 or images.shape[-2] < kernel[0] or images.shape[-1] < kernel[1]:
            raise ValueError(
                f"expected images (B, C, H, W) of at least {kernel[0]}x{kernel[1]}, got {tuple(images.shape)}"
            )
        per_image = (images.shape[-2] - kernel[0] + 1) * (images.shape[-1] - kernel[1] + 1)
        step = max(1, PATCHES_PER_CHUNK // per_image)
        for start in range(0, images.shape[0], step):
            cols = F.unfold(images[start : start + step].float(), kernel)  # (b, d, patches per image)
            p = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (n, d)
            gram, sums = (p.T @ p).double(), p.sum(dim=0).double()
            total = gram if total is None else total + gram
            mean_sum = sums if mean_sum is None else mean_sum + sums
            count += p.shape[0]
    if count < 2:
        raise ValueError("patch whitening needs at least two patches; got no images")
    mean = mean_sum / count
    return (total - count * torch.outer(mean, mean)) / (count - 1)


def whitening_filters(
    cov: torch.Tensor, out_channels: int, shape: tuple[int, int, int], eps: float = WHITEN_EPS
) -> torch.Tensor:
    """At most `out_channels` whitening filters (n, C, kh, kw) for the patch covariance `cov` (d, d), d = C·kh·kw:
    the leading eigenvectors scaled by 1 / sqrt(eigenvalue + eps), first the +V half, then the same with -V, then
    (an odd count) one more +V."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
    scaled = (eigenvectors / torch.sqrt(eigenvalues.clamp(min=0) + eps)).T  # (d, d): one filter per row
    d = scaled.shape[0]
    pairs = min(d, out_channels // 2)
    single = min(out_channels - 2 * pairs, d - pairs)
    rows = torch.cat([scaled[:pairs], -scaled[:pairs], scaled[pairs : pairs + single]])
    return rows.reshape(-1, *shape)


def whiten_conv(conv: nn.Conv2d, batches: Iterable[torch.Tensor], eps: float = WHITEN_EPS) -> int:
    """Set the first filters of `conv` to the whitening filters of the patches of `batches` (float images as
    `conv` will see them); returns how many were set."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError(f"patch whitening needs a plain conv (groups 1, dilation 1), got {conv}")
    cov = patch_covariance(batches, conv.kernel_size)
    filters = whitening_filters(cov, conv.out_channels, (conv.in_channels, *conv.kernel_size), eps)
    with torch.no_grad():
        conv.weight[: len(filters)].copy_(filters.to(conv.weight.dtype))
    return len(filters)


def first_stem_conv(model: nn.Module) -> nn.Conv2d:
    """The first conv of a model's conv tokenizer (`stem: conv`); a ValueError for any other tokenizer."""
    stem = getattr(model.patch_embed, "stem", None)
    if getattr(model.cfg, "stem", None) != "conv" or stem is None or not isinstance(stem[0], nn.Conv2d):
        raise ValueError(
            "whiten_stem initialises the first layer of a conv tokenizer (model_kwargs: {stem: conv}); this model "
            f"embeds patches with stem={model.cfg.stem!r} (one strided conv over whole patches): use stem: conv or "
            "drop whiten_stem (--no-whiten-stem)"
        )
    return stem[0]
