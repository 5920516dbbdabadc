"""vitkit's CPU speed, in one place: prepacked bf16 weights, block plans, C++ kernels, the shortened last block.

The model (`vitkit/model/`) is plain PyTorch and reads like the idea. Its forward asks this package one question
per call, `select(model, x, ...)`: which runner should run this call's patch embedding and blocks? The answer is
None (the modules as written) or a runner that does the same arithmetic faster on this machine:

    CPU bf16 inference (eval, no grad, autocast or bf16 weights)   -> inference.InferenceRunner (packed plans)
    CPU bf16 autocast training, kernels built                     -> training.TrainingRunner  (kernel ops)
    "token" pooling, whatever the device                          -> blocks.Runner (last block: class row only)

The package imports nothing from vitkit.model: it reads the modules by timm's attribute names (`attn.qkv`,
`mlp.fc1`, `norm1`, `ls1.gamma`, ...), so imports flow one way (model -> fast). Switches for A/B measurements:
VITKIT_FAST_INFERENCE=0 / `packing.disabled()` and VITKIT_CPU_KERNELS=0 / `kernels.disabled()`.

`select` is also where a CPU forward adapts the thread count to the load, when `vitkit.threads` was configured to
(`--threads auto`, the `vitkit` command's default): once per call, on the thread that runs it.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from .. import threads
from . import kernels, packing, training
from .blocks import Runner, has_hooks
from .inference import InferenceRunner
from .packing import clear_cache
from .training import TrainingRunner

__all__ = ["select", "clear_cache", "kernels", "packing", "Runner", "InferenceRunner", "TrainingRunner"]


def select(model: nn.Module, x: torch.Tensor, want_attn: Collection[int], pooled_only: bool) -> Runner | None:
    """The runner for one forward of `model` on `x`, or None for the modules as written.

    want_attn: the blocks asked for their attention map. pooled_only: the caller reads only the pooled output
    (`forward`), so the last block may be shortened to the rows the pooling reads.
    """
    if x.device.type == "cpu" and threads.following_load():  # the thread count for the load now (vitkit/threads.py)
        ph, pw = model.patch_embed.patch_size
        threads.adapt(rows=x.shape[0] * (x.shape[-2] // ph) * (x.shape[-1] // pw))
    depth = len(model.blocks)
    rows = 1 if pooled_only and _pools_first_token_only(model, want_attn) else None
    if packing.engaged(model, x):
        return InferenceRunner(depth, rows)
    if training.engaged(x):
        return TrainingRunner(depth, rows)
    return Runner(depth, rows) if rows is not None else None


def _pools_first_token_only(model: nn.Module, want_attn: Collection[int]) -> bool:
    """Whether the logits read the first token alone ("token" pooling): the last block then runs for that row only.

    Not when the last layer's full attention map is asked for, or when a hook on the last block, under it, or on
    the final norm could see the shorter (B, 1, D) tensors.
    """
    depth = len(model.blocks)
    if model.cfg.global_pool != "token" or not depth or depth - 1 in want_attn:
        return False
    return not has_hooks(model.blocks[-1], model.norm)
