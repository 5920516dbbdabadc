"""Turn per-layer attention maps (B, heads, N, N) into per-image heatmaps over the patch grid (B, h, w)."""

from __future__ import annotations

import torch


def cls_attention(attn: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], head: int | str = "mean"):
    """How much the class token attends to each patch in one layer: (B, heads, N, N) -> (B, h, w).

    Register tokens are prefix tokens and are left out of the map. head="mean" averages the heads;
    an int selects one; "all" keeps them: (B, heads, h, w). Each map is rescaled to sum to 1 over patches.
    """
    a = attn[:, :, 0, num_prefix_tokens:]  # (B, heads, h*w): row of the cls query, patch keys only
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    a = a.reshape(a.shape[0], a.shape[1], *grid)  # (B, heads, h, w)
    if head == "mean":
        return a.mean(dim=1)
    if head == "all":
        return a
    return a[:, int(head)]
