"""vitkit's CPU kernels (vitkit/fast/kernels.py) against PyTorch's ops, op alone and in whole models.

    .venv/bin/python benchmarks/cpu_kernels.py                                           # ViT-S/16 b32 and b1
    ... --models s16_224:32,s16_224:1,ti4_32:128,ti4_32:1,b16_224:16,s14_224:8,s16_384:4     # more shapes
    ... --train s16_224:32,ti4_32:128 --models ''                                           # training only

Op alone: attention from a (B, N, 3C) bf16 qkv tensor, the kernel vs SDPA on the same layout, and LayerNorm of a
(B, 197, 384) bf16 tensor, the kernel vs F.layer_norm (medians). Whole model: `create_model` +
`torch.autocast("cpu", bf16)` + `torch.inference_mode()`, with the kernels and without (`cpu_kernels.disabled()`:
SDPA and F.layer_norm) alternating call by call in one process, so drift in the machine's pace hits both.
Training (`--train`): one step (bf16 autocast forward, cross-entropy, backward, AdamW, as benchmarks/throughput.py
runs it) with all the kernels, without any, and with each training kernel alone switched off (the attention with its
backward, the residual add, the LayerNorm to bf16), the variants alternating step by step.
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
from vitkit.fast import kernels as cpu_kernels

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


# The training kernels, each switched off by replacing its entry point with what the model runs without it.
TRAINING_KERNELS = {
    "attention": ("trainable", lambda tokens, head_dim: False),
    "residual add": ("residual_add", lambda x, y: x + y),
    "LayerNorm to bf16": ("layer_norm_to_bf16", lambda x, norm: None),
}


def train_step_variants(key: str, batch: int, rounds: int) -> dict[str, float]:
    """Median ms of a training step per variant: "all kernels", "none", and "without <kernel>" for each one."""
    name, kwargs, img = MODELS[key]
    model = vitkit.create_model(name, **kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, model.cfg.num_classes, (batch,))

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(variant: str) -> float:
        saved = {}
        if variant.startswith("without "):
            attr, stand_in = TRAINING_KERNELS[variant[len("without ") :]]
            saved[attr] = getattr(cpu_kernels, attr)
            setattr(cpu_kernels, attr, stand_in)
        try:
            t = time.perf_counter()
            if variant == "none":
                with cpu_kernels.disabled():
                    step()
            else:
                step()
            return time.perf_counter() - t
        finally:
            for attr, fn in saved.items():
                setattr(cpu_kernels, attr, fn)

    variants = ["all kernels", "none"] + [f"without {k}" for k in TRAINING_KERNELS]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up: each variant's first step allocates and builds kernels' caches
        run(v)
    for i in range(rounds):
        for v in variants if i % 2 else variants[::-1]:
            times[v].append(run(v))
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", default="s16_224:32,s16_224:1", help="comma list of MODEL:BATCH, MODEL in " + ",".join(MODELS)
    )
    p.add_argument(
        "--calls", type=int, default=0, help="alternating calls per path (default: 9 at batch >= 8, 61 below)"
    )
    p.add_argument("--train", default="", help="comma list of MODEL:BATCH for the training-step A/B (e.g. s16_224:32)")
    p.add_argument("--rounds", type=int, default=5, help="alternating training steps per variant (default 5)")
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
    if args.models:
        print("\nwhole model, with the kernels and without (SDPA, F.layer_norm), alternating call by call:")
    for item in filter(None, args.models.split(",")):
        key, batch = item.split(":")
        calls = args.calls or (9 if int(batch) >= 8 else 61)
        ours, theirs = whole_model(key, int(batch), calls)
        print(
            f"  {key} batch {batch:>3}: kernels {ours:.2f} ms, without {theirs:.2f} ms "
            f"({theirs / ours:.3f}x, {calls} calls each)"
        )
    for item in filter(None, args.train.split(",")):
        key, batch = item.split(":")
        print(f"\ntraining step {key} batch {batch} (bf16 autocast + AdamW), median of {args.rounds}, alternating:")
        ms = train_step_variants(key, int(batch), args.rounds)
        for variant, t in ms.items():
            print(f"  {variant:<28} {t:8.1f} ms   all kernels are {t / ms['all kernels']:.3f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
