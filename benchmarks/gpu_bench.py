"""vitkit vs timm on one CUDA GPU: training step and inference, bf16 autocast, flash attention via SDPA, eager and
torch.compile. Called by benchmarks/gpu.sh; `--dry-run` runs every code path on the CPU in seconds (tiny models,
one repetition, torch.compile with the "eager" backend so no compiler is needed).

    PYTHONPATH=. python benchmarks/gpu_bench.py [--dry-run] [--json] [--out benchmarks/results/gpu.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import append_record  # noqa: E402
from throughput import ARCHS, Arch, build  # noqa: E402

GPU_BATCH = {"ti4_32": 512, "s16_224": 256, "b16_224": 128}  # big enough to fill a GPU
COMPILED = {("s16_224", "train"), ("s16_224", "infer")}  # inductor takes ~30-60 s a model: only these fit 8 min


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def workload(model: torch.nn.Module, a: Arch, mode: str, device: torch.device) -> Callable[[], None]:
    """A bf16 training step (forward, backward, fused AdamW) or a bf16 inference forward."""
    x = torch.randn(a.batch, 3, a.img, a.img, device=device)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        y = torch.randint(0, a.classes, (a.batch,), device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    model.eval()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    return infer


def measure(a: Arch, mode: str, device: torch.device, compiled: bool, reps: int, warmup: int, dry: bool) -> dict:
    """Median seconds per call for vitkit and timm, interleaved; compile time when compiled."""
    fns, compile_s = {}, {}
    for lib in ("vitkit", "timm"):
        torch.manual_seed(0)
        model = build(lib, a).to(device)
        if compiled:
            model = torch.compile(model, backend="eager" if dry else "inductor")
        fn = workload(model, a, mode, device)
        t = time.perf_counter()
        fn()  # the first call compiles
        sync(device)
        compile_s[lib] = time.perf_counter() - t
        for _ in range(warmup):
            fn()
        fns[lib] = fn
    samples: dict[str, list[float]] = {lib: [] for lib in fns}
    order = list(fns)
    for _ in range(reps):
        for lib in order:
            sync(device)
            t = time.perf_counter()
            fns[lib]()
            sync(device)
            samples[lib].append(time.perf_counter() - t)
        order = order[1:] + order[:1]
    out = {"median_s": {k: statistics.median(v) for k, v in samples.items()}}
    if compiled:
        out["compile_s"] = compile_s
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, one repetition: check the code paths")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every row")
    p.add_argument("--out", help="append this run (commit, device, every row) as one line to this .jsonl file")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device found; run with --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
        peak_note = "flash SDPA: " + str(torch.backends.cuda.flash_sdp_enabled())
    else:
        name, peak_note = "CPU (dry run)", "dry run: numbers mean nothing"
    print(f"device: {name}; torch {torch.__version__}; {peak_note}")
    reps, warmup = (1, 0) if dry else (args.reps, 3)
    rows = []
    print(f"{'workload':<34}{'compile':>8}{'vitkit img/s':>14}{'timm img/s':>12}{'ratio':>8}{'compile s':>18}")
    # every eager row first, then the compiled ones: a time limit that cuts the run short loses the slow compiles
    plan = [(key, mode, False) for key in ARCHS for mode in ("train", "infer")]
    plan += [(key, mode, True) for key in ARCHS for mode in ("train", "infer") if dry or (key, mode) in COMPILED]
    for key, mode, compiled in plan:
        a = replace(ARCHS[key], batch=GPU_BATCH[key])
        if dry:  # same code paths, a model that runs in milliseconds
            a = replace(a, depth=1, batch=2, img=a.patch * 2)
        r = measure(a, mode, device, compiled, reps, warmup, dry)
        med = r["median_s"]
        ratio = med["timm"] / med["vitkit"]
        cs = r.get("compile_s", {})
        cs_txt = f"{cs['vitkit']:.0f} / {cs['timm']:.0f}" if cs else "-"
        label = f"{ARCHS[key].title} {mode} b{a.batch} bf16"
        print(
            f"{label:<34}{'yes' if compiled else 'no':>8}{a.batch / med['vitkit']:>14.0f}"
            f"{a.batch / med['timm']:>12.0f}{ratio:>7.2f}x{cs_txt:>18}",
            flush=True,
        )
        rows.append(dict(arch=key, mode=mode, batch=a.batch, compiled=compiled, ratio=round(ratio, 3), **r))
    figures = {"device": name, "torch": torch.__version__, "rows": rows}
    if args.json:
        print(json.dumps(figures))
    if args.out and not dry:
        print(f"appended to {append_record(args.out, 'gpu_bench', figures)}")
    with contextlib.suppress(Exception):
        if device.type == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
