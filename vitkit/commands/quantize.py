"""vitkit quantize: a checkpoint -> its int8 version (block linears in int8, activations calibrated on a few hundred
images), a .safetensors file every verb loads like any vitkit checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import CHECKPOINT_HELP

HELP = "quantize a checkpoint to int8 for faster CPU inference (activations calibrated on --calib images)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..quant import DEFAULT_IMAGES

    p.add_argument("checkpoint", help=CHECKPOINT_HELP + "; also a run folder or a last.ckpt")
    p.add_argument("-o", "--out", required=True, help="the int8 checkpoint to write (.safetensors)")
    p.add_argument(
        "--calib",
        help="calibration images, any --data spec (folder, .tar, .csv, cifar10, ...); labels are not used. Without "
        "it the activations are quantized per call (dynamic: no calibration, slower)",
    )
    p.add_argument(
        "--calib-images", type=int, default=DEFAULT_IMAGES, help=f"images drawn from --calib (default {DEFAULT_IMAGES})"
    )
    p.add_argument(
        "--val-split",
        type=float,
        default=None,
        help="draw no calibration image from the held-out fraction a training run with this split used (so that "
        "`vitkit evaluate --val-split` never scores an image the grids were calibrated on)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that split and of the draw (default 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", help="decode cache folder")


def run(args: argparse.Namespace) -> int:
    from ..quant import is_quantized, quantize_calibrated, quantize_model
    from .evaluate import load_any

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must be a .safetensors file (vitkit's checkpoint format), got '{out}'")
    model, ckpt = load_any(args.checkpoint)
    if is_quantized(model):
        raise ValueError(f"'{ckpt}' is already an int8 model")
    start = time.perf_counter()
    if args.calib:
        q = quantize_calibrated(
            model, args.calib, args.calib_images, batch_size=args.batch_size, val_split=args.val_split,
            seed=args.seed, cache_dir=args.cache_dir, inplace=True,
        )  # fmt: skip
    else:
        q = quantize_model(model, inplace=True)
    q.save(out, quantized_from=str(ckpt))
    record = q.quantization
    calib = record.get("calibration")
    how = (
        f"static activations calibrated on {calib['images']} images of {calib['source']}"
        if calib
        else "dynamic activations (no --calib)"
    )
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB): int8 block linears, {how}; {time.perf_counter() - start:.1f} s")
    print(f"run it like any checkpoint: vitkit predict {out} IMAGES   (vitkit evaluate {out} --data ... scores it)")
    return 0
