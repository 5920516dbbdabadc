"""bf16 autocast training on the CPU: each block's attention, pre-norms and residual adds on vitkit's kernels.

The same arithmetic as the modules (`blocks.block_forward` with the kernels' ops swapped in), with autograd:
- attention with its own backward (`kernels.attention_with_grad`) where `auto` would pick explicit attention: no
  (B, heads, N, N) probabilities are kept between forward and backward;
- the pre-norm LayerNorms write bf16 straight away (`kernels.layer_norm_to_bf16`): autocast would run them in fp32
  and the next linear would cast the result, a pass more each way;
- the residual adds take the fp32 stream and the bf16 branch in one pass (`kernels.residual_add`), where PyTorch's
  mixed-dtype add first converts the branch into a temporary.
Each op falls back to PyTorch's where the kernels do not take a call. benchmarks/cpu_kernels.py --train measures
the whole training step with each kernel switched off in turn; tests/test_cpu_kernels.py checks the gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .blocks import Runner, block_forward, has_hooks


def engaged(x: torch.Tensor) -> bool:
    """Whether this forward records bf16 autocast gradients on the CPU with the kernels loaded."""
    if not torch.is_grad_enabled() or not x.is_cpu or not torch.is_autocast_enabled("cpu"):
        return False
    if torch.get_autocast_dtype("cpu") != torch.bfloat16 or torch.compiler.is_compiling():
        return False  # a C++ call would break torch.compile's graph
    return kernels.kernel() is not None


class TrainingRunner(Runner):
    """The runner `vitkit.fast.select` picks for bf16 autocast training on the CPU (`engaged`)."""

    def block(
        self, i: int, blk: nn.Module, x: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if need_weights or has_hooks(blk):
            return blk(x, need_weights)
        out = block_forward(blk, x, self.rows_for(i), _pre_norm, kernels.residual_add, _kernel_attention)
        return out, None


def _pre_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = kernels.layer_norm_to_bf16(x, norm) if isinstance(norm, nn.LayerNorm) else None
    return norm(x) if y is None else y


def _kernel_attention(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor | None:
    """softmax(q kᵀ/√d) v on the kernels, (B, N, 3D) -> (B, N, D); None where they do not take the call: not bf16,
    a backend other than `auto`, qk-norm, attention dropout in training, or a shape they do not cover."""
    if not qkv.requires_grad or qkv.dtype != torch.bfloat16 or attn.backend != "auto":
        return None
    if not isinstance(attn.q_norm, nn.Identity) or (attn.training and attn.attn_drop.p > 0):
        return None
    N = qkv.shape[1]
    if attn.backend_for("cpu", N, True, True) != "math" or not kernels.trainable(N, attn.head_dim):
        return None
    return kernels.attention_with_grad(qkv, attn.num_heads, attn.scale)
