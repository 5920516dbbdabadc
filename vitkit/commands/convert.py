"""vitkit convert: any supported checkpoint (timm, transformers, torchvision, JAX .npz) -> a vitkit checkpoint, or a
transformers / timm folder (`--to hf|timm`) that those libraries load, with a model card."""

from __future__ import annotations

import argparse

from . import CHECKPOINT_HELP

HELP = "convert a checkpoint to vitkit safetensors, or to a transformers / timm folder (--to), and print the report"


def add_override_arguments(p: argparse.ArgumentParser) -> None:
    """The overrides every loading verb accepts (timm names)."""
    p.add_argument("--img-size", type=int, nargs="+", metavar="PX", help="new image size (H [W]): resamples positions")
    p.add_argument("--num-classes", type=int, help="new class count: replaces the head (zero-initialised)")
    p.add_argument("--num-heads", type=int, help="head count, for non-standard widths in formats that do not store it")
    p.add_argument(
        "--global-pool", choices=["token", "avg", "map", "none"], help="pooling, when the shapes allow several"
    )


def overrides_from_args(args: argparse.Namespace) -> dict:
    out = {}
    if getattr(args, "img_size", None):
        size = args.img_size
        out["img_size"] = size[0] if len(size) == 1 else tuple(size[:2])
    for name in ("num_classes", "num_heads", "global_pool"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help=CHECKPOINT_HELP)
    p.add_argument("dst", help="output: a .safetensors file (--to vitkit), else a folder with README.md (model card)")
    p.add_argument(
        "--to",
        choices=("vitkit", "hf", "timm"),
        default="vitkit",
        help="vitkit (default; a folder when DST does not end in .safetensors), hf (transformers' "
        "ViTForImageClassification / ViTModel folder) or timm (its Hub folder: local-dir:DST, hf-hub: once pushed)",
    )
    p.add_argument("--no-strict", action="store_true", help="load what matches; report the rest instead of failing")
    add_override_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..interop import convert

    report = convert(args.src, args.dst, strict=not args.no_strict, to=args.to, **overrides_from_args(args))
    print(report.details())
    single_file = args.to == "vitkit" and args.dst.endswith(".safetensors")
    print(f"wrote {args.dst}" + ("" if single_file else f" ({args.to} folder with README.md)"))
    return 0
