"""A/B of the CPU bf16 inference fast path (vitkit/fast/packing.py), ViT-S/16 @224, one process, interleaved.

    .venv/bin/python benchmarks/inference_fast_path.py --batch 32 --reps 9
    .venv/bin/python benchmarks/inference_fast_path.py --batch 1 --reps 31

Rows: timm under bf16 autocast; the same vitkit model with the fast path switched off (`fast_inference.disabled()`,
the ordinary autocast ops) and on (the default); the bf16-weight copy (`low_precision_inference`); with
`--compiled`, the opt-in `torch-compile` predict/serve backend (inductor with frozen weights). All under
`torch.inference_mode()`, the order rotating every repetition; median (and min) ms per forward.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--compiled", action="store_true", help="add the `torch-compile` predict backend (compiles first)")
    args = p.parse_args()

    import timm

    import vitkit
    from vitkit.fast import packing as fast_inference
    from vitkit.model.precision import low_precision_inference

    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"load before: {uptime()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fast path kernels available: {fast_inference.available()}")
    kw = dict(embed_dim=384, depth=12, num_heads=6, num_classes=1000)
    torch.manual_seed(0)
    vk = vitkit.create_model("vit_base_patch16_224", **kw).eval()
    tm = timm.create_model("vit_base_patch16_224", **kw).eval()
    lp = low_precision_inference(vk)
    x = torch.randn(args.batch, 3, 224, 224)

    def case(model, autocast=True, off=False):
        def run():
            off_ctx = fast_inference.disabled() if off else contextlib.nullcontext()
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast), off_ctx:
                return model(x)

        return run

    fns = {
        "timm (autocast)": case(tm),
        "vitkit, fast path off (autocast)": case(vk, off=True),
        "vitkit (autocast, default)": case(vk),
        "vitkit low_precision_inference": case(lp, autocast=False),
    }
    if args.compiled:  # the opt-in predict/serve backend: torch.compile with inductor freezing
        from vitkit.infer.predict import torch_backend

        t0 = time.perf_counter()
        run_compiled = torch_backend(copy.deepcopy(vk), compile=True)
        run_compiled(x)
        print(f"torch-compile backend: first call (compile) {time.perf_counter() - t0:.1f} s")
        fns["vitkit torch-compile backend"] = lambda: run_compiled(x)
    for fn in fns.values():
        fn(), fn()  # warm-up (and the packing, once)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(args.reps):
        for k in order:
            t = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t)
        order = order[1:] + order[:1]
    timm_ms = statistics.median(samples["timm (autocast)"]) * 1e3
    for k, v in samples.items():
        ms = statistics.median(v) * 1e3
        print(f"batch {args.batch}  {k:34s} {ms:8.1f} ms (min {min(v) * 1e3:6.1f})   timm / this {timm_ms / ms:.2f}x")
    print(f"load after: {uptime()}")


if __name__ == "__main__":
    main()
