"""Inference latency: onnxruntime (the `vitkit export --dynamic` graph) vs PyTorch fp32 and bf16 autocast.

Same weights, same random input, same thread count for both engines (onnxruntime without spinning idle threads,
which would otherwise steal the cores from PyTorch); median wall time of calls taken in turns after warm-up.
Ratios are PyTorch time / onnxruntime time (> 1: onnxruntime faster).

    .venv/bin/python benchmarks/onnx_latency.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py; scripts run as `python benchmarks/<name>.py`

import vitkit
from vitkit.infer.export import export_onnx
from vitkit.infer.onnx_backend import OnnxModel

MODELS = {  # label -> (name, overrides)
    "ViT-S/16@224": ("S/16", dict(img_size=224, num_classes=1000)),
    "ViT-Ti/4@32": ("Ti/4", dict(img_size=32, num_classes=10)),
}


def median_ms(runners: dict, x: torch.Tensor, min_reps: int, min_seconds: float) -> dict[str, float]:
    """Median ms per call of each runner, after two warm-up calls each.

    The runners take turns (round robin) until each has at least `min_reps` calls and `min_seconds` have passed,
    so load from other processes on the machine hits all of them alike.
    """
    for fn in runners.values():
        for _ in range(2):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    start = time.perf_counter()
    while min(map(len, times.values())) < min_reps or time.perf_counter() - start < min_seconds:
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def torch_runner(model: torch.nn.Module, bf16: bool):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(x)

    return run


def machine() -> str:
    import onnxruntime

    cpu = cpu_model()
    return (
        f"{cpu}, {torch.get_num_threads()} threads; Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print("load average at start (other processes on the machine): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print("| model | batch | onnxruntime fp32 ms | torch fp32 ms | torch bf16 ms | fp32 / ort | bf16 / ort |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tmp = Path(tempfile.mkdtemp(prefix="vitkit-bench-"))
    for label in args.models:
        name, overrides = MODELS[label]
        torch.manual_seed(0)
        model = vitkit.create_model(name, **overrides).eval()
        path = export_onnx(model, tmp / f"{name.replace('/', '_')}.onnx", dynamic=True).path
        # no busy-waiting of onnxruntime's idle threads: it would steal the cores from PyTorch's turn
        ort = OnnxModel(path, threads=torch.get_num_threads(), session_config={"session.intra_op.allow_spinning": "0"})
        runners = {"ort": ort, "fp32": torch_runner(model, False), "bf16": torch_runner(model, True)}
        for batch in args.batches:
            x = torch.randn(batch, 3, *model.cfg.img_size)
            ms = median_ms(runners, x, args.min_reps, args.min_seconds)
            print(
                f"| {label} | {batch} | {ms['ort']:.1f} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | "
                f"{ms['fp32'] / ms['ort']:.2f} | {ms['bf16'] / ms['ort']:.2f} |",
                flush=True,
            )
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
