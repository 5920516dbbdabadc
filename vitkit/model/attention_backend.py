"""How `attn_backend="auto"` chooses between PyTorch's fused SDPA and explicit matmul-softmax attention.

The rule is a table of measurements, not a guess: `benchmarks/attention_backend.py` times one Attention layer both
ways per sequence length and prints the lengths to copy into MATH_MAX_TOKENS (its table is in benchmarks/README.md).

Training (forward + backward): PyTorch's CPU SDPA backward is slow at short sequences, so explicit attention wins
up to ~257 tokens; from ~400 tokens on SDPA is as fast or faster and needs no N x N buffer per head. Inference: the
two tie at short sequences and SDPA wins above, so inference always uses SDPA. On CUDA, fused SDPA (flash /
memory-efficient kernels) wins at every length, so `auto` always picks it there. Where vitkit's CPU kernels are
built, bf16 training that `auto` sends to explicit attention runs on the kernels' attention with its own backward
instead (`vitkit.fast.training`): the same softmax(q kᵀ / √d) v, measured by `benchmarks/cpu_kernels.py --train`.
"""

from __future__ import annotations

# Longest sequence (tokens incl. cls/registers) at which explicit attention beats SDPA, per device and mode, for
# bf16/fp16 compute. Above it `auto` uses SDPA. 0 means "always SDPA".
MATH_MAX_TOKENS: dict[tuple[str, bool], int] = {
    ("cpu", True): 320,  # training: math wins up to 257 tokens (ViT-*/16 @256 px), SDPA from ~400 on
    ("cpu", False): 0,  # inference: a tie up to ~150 tokens, SDPA faster above
}


def pick_backend(device_type: str, seq_len: int, training: bool, low_precision: bool = True) -> str:
    """Return "math" or "sdpa" for one attention call.

    low_precision: the attention runs in bf16/fp16 (autocast or half weights). In fp32 explicit attention does not
    pay (a whole ViT-S/16 training step is slower with it, benchmarks/throughput.py), so fp32 always uses SDPA.
    """
    if not low_precision:
        return "sdpa"
    limit = MATH_MAX_TOKENS.get((device_type, training), 0)
    return "math" if seq_len <= limit else "sdpa"
