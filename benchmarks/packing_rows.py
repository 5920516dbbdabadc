"""The table behind fast_inference.ROW_PACKED_PROJECTIONS: for each ViT width and batch size, is a block's proj and
fc2 faster from a weight oneDNN packed for a one-row input than from its default packing?

Two copies of one model, one whose blocks always use the one-row packing for proj and fc2 and one that never does,
called alternately (ABBA) on the same input under the CPU bf16 inference fast path; median ms of each.

    .venv/bin/python benchmarks/packing_rows.py [--calls 100]

Enter a width's row range (tokens x batch) in ROW_PACKED_PROJECTIONS where the ratio is clearly above 1.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import vitkit  # noqa: E402
from benchmarks.machine import cpu_model  # noqa: E402
from vitkit.fast import packing as fast_inference  # noqa: E402

CASES = [  # (model, kwargs, batch sizes)
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4), (1, 4, 8)),
    ("vit_small_patch16_224", {}, (1, 2, 4, 8)),
    ("vit_base_patch16_224", {}, (1, 2)),
]


def _built(model: torch.nn.Module, table: dict, x: torch.Tensor) -> torch.nn.Module:
    """`model` with its block plans built under `table` (the plans keep what they were built with)."""
    saved = dict(fast_inference.ROW_PACKED_PROJECTIONS)
    fast_inference.ROW_PACKED_PROJECTIONS.clear()
    fast_inference.ROW_PACKED_PROJECTIONS.update(table)
    try:
        model(x)
    finally:
        fast_inference.ROW_PACKED_PROJECTIONS.clear()
        fast_inference.ROW_PACKED_PROJECTIONS.update(saved)
    return model


def measure(name: str, kwargs: dict, batch: int, calls: int) -> tuple[float, float, int, int]:
    """(ms default packing, ms one-row packing, width, rows per projection) for one model and batch size."""
    base = vitkit.create_model(name, **kwargs).eval()
    x = torch.randn(batch, 3, *base.cfg.img_size)
    width = base.cfg.embed_dim
    h, w = base.patch_grid(x)
    twin = copy.deepcopy(base)  # outside inference_mode: a copy made inside it holds inference tensors (no fast path)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        default = _built(base, {}, x)
        one_row = _built(twin, {width: (0, 1 << 30)}, x)
        times: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(3):
            default(x), one_row(x)
        for i in range(calls):
            for j in (0, 1) if i % 2 else (1, 0):
                t0 = time.perf_counter()
                (default, one_row)[j](x)
                times[j].append(time.perf_counter() - t0)
    rows = batch * (h * w + base.num_prefix_tokens)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, width, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100, help="calls per packing and case (fewer for big batches)")
    args = ap.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; load: {uptime}")
    print(f"{'model':24} {'width':>5} {'batch':>5} {'rows':>6} {'default ms':>10} {'one-row ms':>10} {'gain':>6}")
    for name, kwargs, batches in CASES:
        for batch in batches:
            calls = max(10, args.calls // batch)
            a, b, width, rows = measure(name, kwargs, batch, calls)
            print(f"{name:24} {width:5d} {batch:5d} {rows:6d} {a:10.2f} {b:10.2f} {a / b:5.2f}x", flush=True)
    print("current table:", fast_inference.ROW_PACKED_PROJECTIONS)


if __name__ == "__main__":
    main()
