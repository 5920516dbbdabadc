"""vitkit predict: a checkpoint's predictions for images (a classifier: top-k labels with softmax probabilities; a
multi-label model: every label above its threshold), with the checkpoint's own preprocessing."""

from __future__ import annotations

import argparse
import json
import sys

from . import CHECKPOINT_HELP

HELP = "predict images with a checkpoint: top-k labels and softmax probabilities"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, GIF, ...)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to show per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line instead of text")
    p.add_argument(
        "--backend",
        default="torch",
        help="inference engine: torch (default), torch-compile (compiled on first use), onnxruntime (.onnx files)",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32", "int8"),
        default="bf16",
        help="torch backend arithmetic; int8: block linears in int8, quantized on load (dynamic activations; "
        "`vitkit quantize` writes a calibrated, faster file)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, nargs="+", metavar="H [W]", help="input size (dynamic-size models)")
    p.add_argument(
        "--threshold",
        type=float,
        help="multi-label models: show every label whose probability is above this (default: the checkpoint's)",
    )
    p.add_argument(
        "--out-dir",
        default="masks",
        help="segmentation models: where each image's NAME.mask.png (palette PNG of class indices) and "
        "NAME.overlay.png go (default: ./masks)",
    )


def run(args: argparse.Namespace) -> int:
    from ..infer.predict import Failure, Predictor

    options = {"precision": args.precision} if args.backend in ("torch", "torch-compile") else {}
    size = tuple(args.input_size) if args.input_size else None
    predictor = Predictor(args.checkpoint, backend=args.backend, input_size=size, threshold=args.threshold, **options)
    if predictor.task.name == "segment":  # a class per pixel: mask and overlay PNGs instead of labels
        return run_segmentation(args, predictor)
    results = predictor.predict(args.images, topk=args.topk, batch_size=args.batch_size, errors="collect")
    failed = 0
    for r in results:
        if isinstance(r, Failure):
            failed += 1
            print(f"vitkit predict: {r.error}", file=sys.stderr)
            if args.json:
                print(json.dumps(r.to_dict()))
        elif args.json:
            print(json.dumps(r.to_dict()))
        else:
            top = ", ".join(f"{lab} {p:.1%}" for lab, p in zip(r.labels, r.probs))
            threshold = getattr(r, "threshold", None)  # a multi-label prediction: the labels above it
            print(f"{r.image}: {top or f'no label above {threshold:g}'}")
    if failed:
        print(f"vitkit predict: {failed} of {len(results)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def run_segmentation(args: argparse.Namespace, predictor) -> int:
    """Write each image's mask and overlay PNGs; print the classes it shows (or, with --json, one object a line)."""
    from ..infer.predict import Failure
    from ..infer.segment import Segmenter, write_outputs

    results = Segmenter(predictor).segment(args.images, batch_size=args.batch_size, errors="collect")
    failed = 0
    for r in results:
        if isinstance(r, Failure):
            failed += 1
            print(f"vitkit predict: {r.error}", file=sys.stderr)
            if args.json:
                print(json.dumps(r.to_dict()))
            continue
        pred, rgb = r
        mask_path, overlay_path = write_outputs(pred, rgb, args.out_dir)
        if args.json:
            print(json.dumps({**pred.to_dict(), "mask_png": str(mask_path), "overlay_png": str(overlay_path)}))
        else:
            shares = ", ".join(f"{c['label']} {c['fraction']:.1%}" for c in pred.coverage()[: args.topk])
            print(f"{pred.image}: {shares}; mask {mask_path}, overlay {overlay_path}")
    if failed:
        print(f"vitkit predict: {failed} of {len(results)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0
