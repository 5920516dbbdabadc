"""The pieces every runner shares: a block's forward with swappable ops, hook detection, the plain runner.

A runner decides how one forward of a VisionTransformer runs its patch embedding and blocks (`vitkit.fast.select`).
The plain `Runner` here calls the modules as written and only shortens the last block to the rows that are read
("token" pooling reads the class token alone); `inference.py` and `training.py` derive from it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _module

# hooks registered for every module: a runner that calls ops directly would skip them, or show them other shapes
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

Norm = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (the LayerNorm module, x) -> its output
Add = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (residual stream, branch) -> their sum
KernelAttention = Callable[[nn.Module, torch.Tensor], "torch.Tensor | None"]  # (attn, qkv) -> (B, N, D) or None


def global_hooks() -> bool:
    return any(getattr(_module, name) for name in _GLOBAL_HOOKS)


def has_hooks(*modules: nn.Module) -> bool:
    """Whether a hook is registered globally or on any of `modules` or a module below them.

    A plain walk over `_modules` (about twice as fast as `.modules()` + getattr): it runs once per block per call.
    Distributed wrappers (FSDP2) work through such hooks, so their blocks keep their own forward.
    """
    if global_hooks():
        return True
    stack = list(modules)
    while stack:
        m = stack.pop()
        if any(getattr(m, name) for name in _HOOKS):
            return True
        stack += [c for c in m._modules.values() if c is not None]
    return False


def _call(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def block_forward(
    blk: nn.Module,
    x: torch.Tensor,
    rows: int | None = None,
    norm: Norm = _call,
    add: Add = operator.add,
    kernel_attention: KernelAttention | None = None,
) -> torch.Tensor:
    """`blk`'s forward with its ops swappable: x (B, N, D) -> (B, Q, D), Q = rows or N.

    rows: compute the output of the first Q tokens only. Every row of a block depends on all N inputs through the
    keys and values, but only on its own row after attention, so those rows come out as in the full block with the
    rest of the work skipped (queries for Q rows, proj and MLP for Q rows). norm / add: the pre-norm LayerNorms and
    the residual adds (the CPU kernels' versions in training). kernel_attention: softmax(q kᵀ/√d) v from the qkv
    projection's output for all rows, or None to use the module's own `attend`.
    """
    a = blk.attn
    qkv = a.qkv(norm(blk.norm1, x))  # (B, N, 3D)
    o = kernel_attention(a, qkv) if kernel_attention is not None and rows is None else None
    if o is None:
        q, k, v = a.split_heads(qkv)  # each (B, heads, N, head_dim)
        o, _ = a.attend(q if rows is None else q[:, :, :rows], k, v)  # (B, Q, D)
    r = x if rows is None else x[:, :rows]
    x = add(r, blk.drop_path1(blk.ls1(a.proj_drop(a.proj(o)))))
    return add(x, blk.drop_path2(blk.ls2(blk.mlp(norm(blk.norm2, x)))))  # (B, Q, D)


class Runner:
    """The modules as written; the last block computes only its first `rows` rows when `rows` is set.

    Why shorten it: with "token" pooling the logits read the class token alone, and the other rows' last-block
    outputs feed nothing. Skipping them leaves the logits as they were (up to rounding) and saves most of a block
    (ViT-S/16: proj, MLP and attention for 1 of 197 rows, about 1/12 of the forward and of the backward).
    """

    def __init__(self, depth: int, rows: int | None = None):
        self.last = depth - 1
        self.rows = rows

    def rows_for(self, i: int) -> int | None:
        return self.rows if i == self.last else None

    def patch_embed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)  # (B, C, H, W) -> (B, D, h, w)

    def block(
        self, i: int, blk: nn.Module, x: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.rows_for(i)
        if rows is None:
            return blk(x, need_weights)
        return block_forward(blk, x, rows), None
