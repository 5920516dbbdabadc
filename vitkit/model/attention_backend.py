"""How `attn_backend="auto"` chooses between PyTorch's fused SDPA and explicit matmul-softmax attention.

The rule is a table of measurements, not a guess. Re-measure with

    flock /tmp/vitkit-heavy.lock .venv/bin/python benchmarks/attention_backend.py

and update MATH_MAX_TOKENS below with the lengths it prints.

Measured 2026-11-27 on the 2-core Xeon with AMX (Sapphire Rapids class, KVM), torch 2.14.1, one Attention layer
(qkv + attention + proj) of width 384 / 6 heads, ~8k tokens per batch, bf16 autocast, median ms per call
(load average ~2.2 from other jobs, so +-10 %):

    tokens   train sdpa   train math   infer sdpa   infer math
        17        167.8         62.8         11.8         12.5
        65        155.2         52.3         11.4         11.0
       145        143.9         56.8         18.0         16.1
       197        109.0         70.5         14.7         18.5
       257        115.0         71.8         18.4         20.3
       401        114.4        122.2         20.2         45.4
       577        182.4        164.7         21.8         62.2
      1025        169.4        216.1         25.6         89.0

Training (forward + backward): PyTorch's CPU SDPA backward is slow at short sequences, so explicit attention wins
by 1.5-3x up to ~257 tokens; from ~400 tokens on SDPA is as fast or faster and needs no N x N buffer per head.
Inference: the two tie up to ~150 tokens and SDPA wins above, so inference always uses SDPA. Width 192 / 3 heads
gives the same crossing (train math wins at 17-257 tokens: 26.7 vs 97.9 ms at 17, 37.7 vs 54.3 ms at 257).
On CUDA, fused SDPA (flash / memory-efficient kernels) wins at every length, so `auto` always picks it there.
Where vitkit's CPU kernels are built, bf16 training that `auto` sends to explicit attention runs on the kernels'
attention with its own backward instead (`vitkit.fast.training`): the
same softmax(q kᵀ / √d) v; forward + backward 1.06-1.43x faster than the explicit ops, the whole training step
1.05-1.08x (benchmarks/README.md).
"""

from __future__ import annotations

# Longest sequence (tokens incl. cls/registers) at which explicit attention beats SDPA, per device and mode, for
# bf16/fp16 compute. Above it `auto` uses SDPA. 0 means "always SDPA".
MATH_MAX_TOKENS: dict[tuple[str, bool], int] = {
    ("cpu", True): 320,  # training: math wins 1.5-3x up to 257 tokens (ViT-*/16 @256 px), SDPA from ~400 on
    ("cpu", False): 0,  # inference: a tie up to ~150 tokens, SDPA faster above
}


def pick_backend(device_type: str, seq_len: int, training: bool, low_precision: bool = True) -> str:
    """Return "math" or "sdpa" for one attention call.

    low_precision: the attention runs in bf16/fp16 (autocast or half weights). In fp32 explicit attention does not
    pay: a whole ViT-S/16 training step took 4.60 s with it vs 3.51 s for SDPA (timm), a tie at 65 tokens
    (benchmarks/throughput.py, same machine), so fp32 always uses SDPA.
    """
    if not low_precision:
        return "sdpa"
    limit = MATH_MAX_TOKENS.get((device_type, training), 0)
    return "math" if seq_len <= limit else "sdpa"
