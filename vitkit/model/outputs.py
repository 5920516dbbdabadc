"""What `VisionTransformer.forward_intermediates` returns: each chosen block's output, split by token kind."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Intermediate:
    """One encoder layer's output, split by token kind."""

    layer: int
    patches: torch.Tensor  # (B, D, H/p, W/p): the patch tokens as a feature map
    cls: torch.Tensor | None  # (B, D) or None without a class token
    registers: torch.Tensor | None  # (B, R, D) or None without register tokens
    attention: torch.Tensor | None  # (B, heads, N, N) when asked for


@dataclass
class Intermediates:
    layers: list[Intermediate]
    tokens: torch.Tensor  # (B, N, D): output of the last block run, after the final norm
