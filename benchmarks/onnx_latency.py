"""Inference latency: onnxruntime (the `vitkit export --dynamic` graph) vs PyTorch fp32 and bf16 autocast.

Same weights, same random input, same thread count for both engines; median wall time of repeated calls after
warm-up. Ratios are PyTorch time / onnxruntime time (> 1: onnxruntime faster).

    flock /tmp/vitkit-heavy.lock .venv/bin/python benchmarks/onnx_latency.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vitkit
from vitkit.infer.export import export_onnx
from vitkit.infer.onnx_backend import OnnxModel

MODELS = {  # label -> (name, overrides)
    "ViT-S/16@224": ("S/16", dict(img_size=224, num_classes=1000)),
    "ViT-Ti/4@32": ("Ti/4", dict(img_size=32, num_classes=10)),
}


def median_seconds(fn, x: torch.Tensor, min_reps: int, min_seconds: float) -> float:
    """Median time of fn(x) over at least `min_reps` calls and `min_seconds`, after two warm-up calls."""
    for _ in range(2):
        fn(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_runner(model: torch.nn.Module, bf16: bool):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(x)

    return run


def machine() -> str:
    import onnxruntime

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
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
    print("| model | batch | onnxruntime fp32 ms | torch fp32 ms | torch bf16 ms | fp32 / ort | bf16 / ort |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tmp = Path(tempfile.mkdtemp(prefix="vitkit-bench-"))
    for label in args.models:
        name, overrides = MODELS[label]
        torch.manual_seed(0)
        model = vitkit.create_model(name, **overrides).eval()
        path = export_onnx(model, tmp / f"{name.replace('/', '_')}.onnx", dynamic=True).path
        ort = OnnxModel(path, threads=torch.get_num_threads())
        runners = {"ort": ort, "fp32": torch_runner(model, False), "bf16": torch_runner(model, True)}
        for batch in args.batches:
            x = torch.randn(batch, 3, *model.cfg.img_size)
            ms = {k: 1000 * median_seconds(fn, x, args.min_reps, args.min_seconds) for k, fn in runners.items()}
            print(
                f"| {label} | {batch} | {ms['ort']:.1f} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | "
                f"{ms['fp32'] / ms['ort']:.2f} | {ms['bf16'] / ms['ort']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
