"""How `attn_backend="auto"` chooses between PyTorch's fused SDPA and explicit matmul-softmax attention.

The rule is a table of measurements, not a guess. Re-measure with `python benchmarks/attention_backend.py`
and update MATH_MAX_TOKENS below with what it prints.

Measured 2026-11-27 on the 2-core Xeon with AMX (torch 2.14.1, CPU build in a CUDA wheel), heads of 64
channels, forward+backward under bf16 autocast, time per call, math / sdpa:

    tokens   train (fwd+bwd)   inference (fwd)
    see the table in benchmarks/README.md (section "attention backend"), reproduced by the script above.

On CUDA, fused SDPA (flash / memory-efficient kernels) wins at every length, so `auto` always picks it there.
"""

from __future__ import annotations

# Longest sequence (tokens incl. cls/registers) at which explicit attention beats SDPA, per device and mode.
# Above it `auto` uses SDPA. 0 means "always SDPA".
MATH_MAX_TOKENS: dict[tuple[str, bool], int] = {
    ("cpu", True): 1024,  # training: CPU SDPA backward is slow at short sequences
    ("cpu", False): 0,  # inference: filled from measurement
}


def pick_backend(device_type: str, seq_len: int, training: bool) -> str:
    """Return "math" or "sdpa" for one attention call."""
    limit = MATH_MAX_TOKENS.get((device_type, training), 0)
    return "math" if seq_len <= limit else "sdpa"
