"""Position embeddings as pure functions: the fixed 2-D sin-cos table, and resampling to a new patch grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (in the spirit of MoCo v3 / big_vision; not bit-equal to big_vision's table,
    whose channel order and frequency denominator differ: interop stores big_vision's own table when loading).

    Returns (1, H*W, dim): for each position the first dim/2 channels encode the row (y), the rest the
    column (x); each half is [sin(p * w_k) ..., cos(p * w_k) ...] with w_k = 1 / temperature^(k / (dim/4)).
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos2d needs embed_dim divisible by 4, got {dim}")
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    y = y.reshape(-1, 1) * omega  # (H*W, dim/4)
    x = x.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).unsqueeze(0)  # (1, H*W, dim)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a learned position embedding (1, prefix + Hold*Wold, D) to a new (non-square) patch grid.

    Prefix tokens (cls, registers) keep their embedding untouched. Same grid in, same tensor out.
    `old_grid=None` assumes a square old grid. Interpolation runs in float32 and returns the input dtype.
    """
    n_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(f"cannot infer the grid of {n_patches} position embeddings; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_patches:
        raise ValueError(f"old_grid {old_grid} does not match {n_patches} position embeddings")
    if torch.compiler.is_exporting():  # ONNX / torch.export: the grid is symbolic, resample in the graph always
        new_grid = (new_grid[0], new_grid[1])  # (same grid: bicubic at scale 1 samples pixel centres, an identity)
    else:
        new_grid = (int(new_grid[0]), int(new_grid[1]))
        if tuple(old_grid) == new_grid:
            return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    patches = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, Ho, Wo)
    patches = F.interpolate(patches, size=new_grid, mode=interpolation, antialias=antialias, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)  # (1, prefix + Hn*Wn, D)
