"""Low-precision copies of a model for inference: weights stored in bf16 instead of cast on every call.

Under `torch.autocast("cpu", bf16)` every linear layer casts its fp32 weight to bf16 on every forward. For one
image that cast is a quarter of the time. Measured on the 2-core AMX Xeon, ViT-S/16 @224, torch 2.14.1
(`/tmp` A/B script, interleaved, median of 7; numbers in benchmarks/README.md):

    batch 32: autocast 420 ms -> bf16 weights 342 ms (-19 %);   batch 1: 34.7 ms -> 26.0 ms (-25 %)

Since the CPU inference fast path (vitkit/fast: prepacked weights, fused GELU, bf16 residual stream), the
ordinary model under autocast is as fast as this copy (ViT-S/16 @224: batch 32 233 vs 240 ms, batch 1 15.7 vs
15.4 ms). The copy needs less memory (bf16 weights only, vs fp32 weights + a packed bf16 copy); it takes the same
fast path.

The copy runs everything in bf16 (LayerNorm and softmax accumulate in fp32 inside PyTorch's CPU kernels), so its
logits sit within bf16 tolerance of the fp32 model (tests/test_speed_correctness.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class CastInputs(nn.Module):
    """Run `model` (weights in `dtype`) on inputs cast to `dtype`; return fp32 outputs."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.model(x.to(self.dtype), *args, **kwargs)
        if isinstance(out, tuple):  # (logits, {layer: attention}) from return_attention
            return out[0].float(), {k: v.float() for k, v in out[1].items()}
        return out.float()


def low_precision_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> CastInputs:
    """An eval-mode copy of `model` with weights in `dtype` that takes fp32 images and returns fp32 logits.

    The original model is left untouched (training keeps fp32 master weights). Use it without autocast:
    `fast = low_precision_inference(model); with torch.inference_mode(): logits = fast(images)`.
    """
    return CastInputs(copy.deepcopy(model).to(dtype).eval(), dtype)
