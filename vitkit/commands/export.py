"""vitkit export: a checkpoint -> an ONNX graph (any runtime) or a torch.export `.pt2` program."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CHECKPOINT_HELP

HELP = "export a checkpoint to ONNX (dynamic batch and image size) or torch.export .pt2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..infer.export import DEFAULT_OPSET

    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="onnx (default) or pt2 (torch.export)")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="any batch size and any image size divisible by the patch size (position embeddings resampled in "
        "the graph); without it the graph is fixed at batch 1 and the checkpoint's image size",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 18 (default: {DEFAULT_OPSET})")
    p.add_argument("-o", "--output", help="output file (default: the checkpoint's or repo's name with .onnx / .pt2)")
    p.add_argument("--no-check", action="store_true", help="skip the exported-vs-PyTorch parity check")


def default_output(checkpoint: str, suffix: str) -> Path:
    """Beside a checkpoint file; for a Hub name, in the working folder under the repo's name."""
    from ..interop.hub import HubName, parse_name

    name = parse_name(checkpoint)
    if isinstance(name, HubName):
        return Path(f"{name.repo_id.split('/')[-1]}.{suffix}")
    return Path(checkpoint).with_suffix(f".{suffix}")


def run(args: argparse.Namespace) -> int:
    from ..infer.export import export_onnx, export_pt2
    from ..interop import from_pretrained

    model = from_pretrained(args.checkpoint)
    out = Path(args.output) if args.output else default_output(args.checkpoint, args.format)
    if args.format == "onnx":
        result = export_onnx(model, out, dynamic=args.dynamic, opset=args.opset, check=not args.no_check)
        what = f"ONNX opset {result.opset}"
    else:
        result = export_pt2(model, out, dynamic=args.dynamic, check=not args.no_check)
        what = "torch.export program"
    H, W = model.cfg.img_size
    ph, pw = model.cfg.patch_size
    shape = (
        f"input (B, {model.cfg.in_chans}, H, W) with any B and H, W multiples of {ph}x{pw}"
        if result.dynamic
        else f"input (1, {model.cfg.in_chans}, {H}, {W})"
    )
    print(f"wrote {result.path} ({what}, {shape})")
    if result.max_abs_diff is not None:
        shape_s = "x".join(map(str, result.checked_shape))
        print(f"check: max |exported - PyTorch| = {result.max_abs_diff:.2e} on a {shape_s} input (fp32)")
    return 0
