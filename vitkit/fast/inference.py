"""CPU bf16 inference: each block as a plan of straight-line oneDNN / kernel calls on prepacked weights.

What a plan does that the modules cannot: GELU fused into fc1, each residual add fused into the matmul before it
(proj, fc2: a oneDNN binary post-op), LayerScale folded into the weights, a bf16 residual stream, and no nested
module calls or per-layer checks (at batch 1 those add up to a noticeable share of a ViT-S/16 forward). The patch
embedding runs as one packed matmul of the unfolded patches, which skips oneDNN's per-call conv weight reorder.
Attention and LayerNorm run on vitkit's C++ kernels where they are built (`kernels.py`), else SDPA and
F.layer_norm. Logits stay within bf16 tolerance of the fp32 model (tests/test_fast_inference.py).

A block that cannot take a plan (a hook below it, an attention map asked for, a weight that cannot be packed) runs
its modules on the bf16 stream.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, packing
from .blocks import Runner, block_forward, global_hooks, has_hooks


class InferenceRunner(Runner):
    """The runner `vitkit.fast.select` picks for CPU bf16 inference (`packing.engaged`)."""

    def patch_embed(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        tokens = packed_patch_embed(module, x) if _is_patch_conv(module) else None
        return module(x) if tokens is None else tokens

    def block(
        self, i: int, blk: nn.Module, x: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.to(torch.bfloat16)  # the residual stream stays bf16 from the first block on (a no-op after it)
        rows = self.rows_for(i)
        plan = None if need_weights or blk.attn.backend not in ("auto", "sdpa") else block_plan(blk)
        if plan is not None:
            return run_plan(plan, x, rows), None
        if rows is not None:
            return block_forward(blk, x, rows), None
        return blk(x, need_weights)


def _is_patch_conv(module: nn.Module) -> bool:
    """A plain patch embedding: one conv whose kernel and stride are the patch (not a conv stem)."""
    conv = getattr(module, "proj", None)
    if not isinstance(conv, nn.Conv2d) or hasattr(module, "stem") or has_hooks(module):
        return False
    return conv.kernel_size == tuple(module.patch_size) == conv.stride and conv.padding == (0, 0)


def packed_patch_embed(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """(B, C, H, W) -> (B, D, h, w) as one packed matmul of the (B, h*w, C*p*p) patches; None where it cannot."""
    B, C, H, W = x.shape
    p, q = module.patch_size
    h, w = H // p, W // q
    patches = x[:, :, : h * p, : w * q].to(torch.bfloat16).reshape(B, C, h, p, w, q)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * q)  # (c, i, j): the weight's order
    tokens = packing.linear(module.proj, patches)  # (B, h*w, D)
    return None if tokens is None else tokens.view(B, h, w, -1).permute(0, 3, 1, 2)  # a view: flattens for free


class BlockPlan(NamedTuple):
    """A block's weights as `run_plan` takes them: LayerNorm arguments (shape, weight, bias, eps), packed linears
    (packed bf16 weight, bf16 bias), the head split, and the optional qk-norm LayerNorms. Plain tuple fields: at
    batch 1 each nn.Module attribute lookup adds up over the ~40 a block needs. `params` holds the parameters the
    plan's key names by id, so none of those ids can be reused while the key is compared."""

    norm1: tuple
    norm2: tuple
    qkv: tuple
    proj: tuple
    fc1: tuple
    fc2: tuple
    num_heads: int
    head_dim: int
    qk_norm: tuple | None
    few_rows: tuple | None  # ((lo, hi), proj, fc2): proj and fc2 packed for inputs of lo..hi rows, or None
    params: tuple


def block_plan(blk: nn.Module) -> BlockPlan | None:
    """`blk`'s plan, cached beside it and rebuilt when any parameter under it changes (in place, swapped, or replaced
    with its module); plain attributes (LayerNorm eps, head count) are read when it is built. None when a hook is
    registered on the block or below it (the plan would skip it), or a weight cannot be packed."""
    state = _state_key(blk)
    if state is None:
        return None
    key, params = state
    return packing.cached(blk, key, lambda: _build_plan(blk, params))


def _build_plan(blk: nn.Module, params: tuple[torch.Tensor, ...]) -> BlockPlan | None:
    a, mlp = blk.attn, blk.mlp
    if not all(isinstance(ls, nn.Identity) or hasattr(ls, "gamma") for ls in (blk.ls1, blk.ls2)):
        return None
    if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
        return None  # the fused post-op is the exact erf GELU
    weights = [packing.packed(a.qkv), _packed_scaled(a.proj, blk.ls1)]
    weights += [packing.packed(mlp.fc1), _packed_scaled(mlp.fc2, blk.ls2)]
    if any(w is None for w in weights):
        return None
    ln = lambda n: (n.normalized_shape, n.weight, n.bias, n.eps)  # noqa: E731  (F.layer_norm's arguments)
    qk_norm = None if isinstance(a.q_norm, nn.Identity) else (ln(a.q_norm), ln(a.k_norm))
    rows = packing.ROW_PACKED_PROJECTIONS.get(a.proj.out_features)
    few_rows = None
    if rows is not None:  # proj and fc2 packed a second time, for inputs of rows[0]..rows[1] rows (one more copy)
        few_rows = (rows, _packed_scaled(a.proj, blk.ls1, rows_hint=1), _packed_scaled(mlp.fc2, blk.ls2, 1))
    return BlockPlan(
        ln(blk.norm1), ln(blk.norm2), *weights, a.num_heads, a.head_dim, qk_norm, few_rows, params
    )  # fmt: skip


def _packed_scaled(layer: nn.Module, ls: nn.Module, rows_hint: int | None = None) -> tuple | None:
    """`layer` packed, with a LayerScale after it folded in: gamma * (x Wᵀ + b) = x (gamma W)ᵀ + gamma b, so the
    scaled branch still ends in one matmul with the residual add as its post-op (DINOv2, DeiT-III). The folded copy
    lives in the block's plan (rebuilt when gamma changes: the plan's key covers it), not in the layer's cache, as
    does a copy packed for a given row count (`rows_hint`, packing.ROW_PACKED_PROJECTIONS)."""
    if isinstance(ls, nn.Identity) and rows_hint is None:
        return packing.packed(layer)
    if not packing.packable(layer):
        return None
    weight, bias = layer.weight.detach().float(), None if layer.bias is None else layer.bias.detach().float()
    if not isinstance(ls, nn.Identity):
        gamma = ls.gamma.detach().float()  # (out,)
        weight, bias = weight * gamma[:, None], None if bias is None else bias * gamma
    return packing.pack(weight, bias, rows_hint)


def run_plan(p: BlockPlan, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """One block as straight-line kernel calls: x (B, N, D) bf16 -> (B, Q, D) bf16, Q = rows or N.

    The same arithmetic as the modules (`blocks.block_forward`), with GELU and the residual adds fused.
    """
    lp = torch.ops.mkldnn._linear_pointwise
    B, N, C = x.shape
    x = x.contiguous()
    ln = kernels.layer_norm  # F.layer_norm, or the kernels' where built
    qkv = lp(ln(x, *p.norm1), *p.qkv, "none", [], "")  # (B, N, 3D): q, k, v side by side
    Q = N if rows is None else rows  # only the first Q rows' outputs: their queries, all keys and values
    if rows is not None:
        x = x[:, :rows].contiguous()  # (B, Q, D)
    if p.qk_norm is None and kernels.usable(N, p.head_dim, Q):  # the brgemm kernel (kernels.py)
        o = kernels.attention(qkv.view(B, N, 3 * C), p.num_heads, Q, p.head_dim**-0.5)  # (B, Q, D)
    else:
        q, k, v = qkv.view(B, N, 3, p.num_heads, p.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if p.qk_norm is not None:
            q, k = F.layer_norm(q[:, :, :Q], *p.qk_norm[0]), F.layer_norm(k, *p.qk_norm[1])
        o = F.scaled_dot_product_attention(q[:, :, :Q], k, v).transpose(1, 2).reshape(B, Q, C)  # (B, Q, D)
    proj, fc2 = p.proj, p.fc2
    if p.few_rows is not None and p.few_rows[0][0] <= B * Q <= p.few_rows[0][1]:
        proj, fc2 = p.few_rows[1:]  # the same weights packed for this row count (ROW_PACKED_PROJECTIONS)
    x = lp.binary(o, x, *proj, "add")  # x + proj(o): the add is a post-op of the matmul
    h = lp(ln(x, *p.norm2), *p.fc1, "gelu", [], "none")  # GELU(fc1(.)), exact erf as nn.GELU(); (B, Q, 4D)
    return lp.binary(h, x, *fc2, "add")  # x + fc2(h)


def _state_key(block: nn.Module) -> tuple[tuple, tuple[torch.Tensor, ...]] | None:
    """(key, parameters): every module of `block`, and every parameter's id, version and storage; the parameters.

    None when a hook is registered globally, on the block or on a module below it (a plan would skip it), or a
    parameter is an inference tensor (no version counter). One walk gives the key and the hook check together.
    """
    if global_hooks() or block._forward_hooks or block._forward_pre_hooks:
        return None
    key: list = []
    params: list[torch.Tensor] = []
    stack = list(block._modules.values())  # not the block itself: the cached key must not keep it alive
    try:
        while stack:
            m = stack.pop()
            if m._forward_hooks or m._forward_pre_hooks:
                return None
            key.append(m)
            for t in m._parameters.values():
                if t is not None:
                    key += (id(t), t._version, t.data_ptr())
                    params.append(t)
            stack += [c for c in m._modules.values() if c is not None]
    except RuntimeError:  # inference tensors have no version counter
        return None
    return tuple(key), tuple(params)
