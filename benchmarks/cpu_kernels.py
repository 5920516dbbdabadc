"""vitkit's CPU kernels (vitkit/model/cpu_kernels.py) against PyTorch's ops, op alone and in whole models.

    flock /tmp/vitkit-heavy.lock .venv/bin/python benchmarks/cpu_kernels.py                # ViT-S/16 b32 and b1
    ... --models s16_224:32,s16_224:1,ti4_32:128,ti4_32:1,b16_224:16,s14_224:8,s16_384:4     # more shapes

Op alone: attention from a (B, N, 3C) bf16 qkv tensor, the kernel vs SDPA on the same layout, and LayerNorm of a
(B, 197, 384) bf16 tensor, the kernel vs F.layer_norm (medians). Whole model: `create_model` +
`torch.autocast("cpu", bf16)` + `torch.inference_mode()`, with the kernels and without (`cpu_kernels.disabled()`:
SDPA and F.layer_norm) alternating call by call in one process, so drift in the machine's pace hits both.
Needs the kernels built (`vitkit kernels build`); prints the machine, versions and the kernels' status first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py; scripts run as `python benchmarks/<name>.py`

import vitkit
from vitkit.model import cpu_kernels

# name: (create_model name, kwargs, image size)
MODELS = {
    "ti4_32": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, num_classes=10), 32),
    "s16_224": ("vit_small_patch16_224", {}, 224),
    "s14_224": ("vit_small_patch16_224", dict(patch_size=14), 224),
    "s16_384": ("vit_small_patch16_224", dict(img_size=384), 384),
    "b16_224": ("vit_base_patch16_224", {}, 224),
}


def median_ms(fn, reps: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def sdpa(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)


def op_alone(batch: int, tokens: int, heads: int, head_dim: int) -> tuple[float, float]:
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim).bfloat16()
    ours = median_ms(lambda: cpu_kernels.attention(qkv, heads, tokens, head_dim**-0.5))
    return ours, median_ms(lambda: sdpa(qkv, heads))


def layer_norm_alone(batch: int) -> tuple[float, float]:
    x = torch.randn(batch, 197, 384).bfloat16()
    w, b = torch.randn(384), torch.randn(384)
    ours = median_ms(lambda: cpu_kernels.layer_norm(x, (384,), w, b, 1e-6), reps=200)
    return ours, median_ms(lambda: F.layer_norm(x, (384,), w, b, 1e-6), reps=200)


def whole_model(key: str, batch: int, calls: int) -> tuple[float, float]:
    name, kwargs, img = MODELS[key]
    model = vitkit.create_model(name, **kwargs).eval()
    x = torch.randn(batch, 3, img, img)
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        for _ in range(3):
            model(x)
            with cpu_kernels.disabled():
                model(x)
        for i in range(calls):
            for kernel in (True, False) if i % 2 else (False, True):
                t = time.perf_counter()
                if kernel:
                    model(x)
                else:
                    with cpu_kernels.disabled():
                        model(x)
                times[kernel].append(time.perf_counter() - t)
    return statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", default="s16_224:32,s16_224:1", help="comma list of MODEL:BATCH, MODEL in " + ",".join(MODELS)
    )
    p.add_argument(
        "--calls", type=int, default=0, help="alternating calls per path (default: 9 at batch >= 8, 61 below)"
    )
    args = p.parse_args(argv)
    print(f"machine: {cpu_model()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"kernels: {cpu_kernels.status()}")
    if cpu_kernels.kernel() is None:
        print("nothing to compare: build it with `vitkit kernels build`")
        return 1
    print("\nop alone (attention from the qkv tensor, 197 tokens, 6 heads x 64):")
    for batch in (32, 1):
        ours, theirs = op_alone(batch, 197, 6, 64)
        print(f"  batch {batch:>3}: kernel {ours:.3f} ms, SDPA {theirs:.3f} ms ({theirs / ours:.2f}x)")
    print("\nLayerNorm alone ((B, 197, 384) bf16, fp32 weight and bias):")
    for batch in (32, 1):
        ours, theirs = layer_norm_alone(batch)
        print(
            f"  batch {batch:>3}: kernel {ours * 1e3:.1f} us, F.layer_norm {theirs * 1e3:.1f} us ({theirs / ours:.2f}x)"
        )
    print("\nwhole model, with the kernels and without (SDPA, F.layer_norm), alternating call by call:")
    for item in args.models.split(","):
        key, batch = item.split(":")
        calls = args.calls or (9 if int(batch) >= 8 else 61)
        ours, theirs = whole_model(key, int(batch), calls)
        print(
            f"  {key} batch {batch:>3}: kernels {ours:.2f} ms, without {theirs:.2f} ms "
            f"({theirs / ours:.3f}x, {calls} calls each)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
