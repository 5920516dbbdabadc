"""Time one vitkit Attention layer per backend and sequence length: the measurements behind `attn_backend="auto"`.

    .venv/bin/python benchmarks/attention_backend.py [--dim 384 --heads 6]

For each token count it times the layer (qkv projection, attention, output projection) under bf16 autocast:
training = forward + backward, inference = forward under `torch.inference_mode()`, for `sdpa` (PyTorch's fused
scaled_dot_product_attention) and `math` (explicit matmul-softmax). Batches are sized so every row holds about the
same number of tokens. It prints a table and the longest length at which `math` wins, per mode: copy those into
`MATH_MAX_TOKENS` in vitkit/model/attention_backend.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vitkit.model.layers import Attention  # noqa: E402

LENGTHS = (17, 50, 65, 101, 145, 197, 257, 401, 577, 785, 1025)


def time_layer(layer: Attention, x: torch.Tensor, train: bool, reps: int) -> float:
    """Median seconds of one call (with backward when training)."""

    def once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if train:
                xx = x.detach().requires_grad_()
                y, _ = layer(xx)
                y.float().sum().backward()
            else:
                with torch.inference_mode():
                    layer(x)

    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens-per-batch", type=int, default=8192, help="batch = this // sequence length")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    layers = {b: Attention(args.dim, args.heads, backend=b) for b in ("sdpa", "math")}
    layers["math"].load_state_dict(layers["sdpa"].state_dict())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dim {args.dim}, heads {args.heads}, bf16")
    print(
        f"{'tokens':>7}{'batch':>6}{'train sdpa ms':>15}{'train math ms':>15}{'infer sdpa ms':>15}{'infer math ms':>15}"
    )
    best = {True: 0, False: 0}
    for n in map(int, args.lengths.split(",")):
        batch = max(1, args.tokens_per_batch // n)
        x = torch.randn(batch, n, args.dim)
        row = {}
        for train in (True, False):
            for b in ("sdpa", "math"):
                row[(train, b)] = time_layer(layers[b], x, train, args.reps)
            if row[(train, "math")] < row[(train, "sdpa")]:
                best[train] = n
        cells = "".join(f"{row[(t, b)] * 1e3:>15.2f}" for t in (True, False) for b in ("sdpa", "math"))
        print(f"{n:>7}{batch:>6}{cells}")
    print(f"\nlongest length where math wins: training {best[True]}, inference {best[False]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
