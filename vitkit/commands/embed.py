"""vitkit embed: image features from a checkpoint, saved as a .npy array (one row per image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CHECKPOINT_HELP

HELP = "embed images with a checkpoint: pooled features (N, D) or patch features (N, h*w, D) to a .npy file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files or folders (folders: all images inside, sorted)")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="output .npy; the image names go to <out>.txt in row order (bad images: left out)",
    )
    p.add_argument("--patch", action="store_true", help="patch-token features instead of the pooled vector")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--precision",
        choices=["bf16", "fp32", "int8"],
        default="bf16",
        help="int8: block linears in int8, quantized on load (dynamic activations)",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    import numpy as np

    from ..files import atomic_write, atomic_write_bytes
    from ..infer.embed import embed_all, expand_image_paths

    paths = expand_image_paths(args.images)
    result = embed_all(args.checkpoint, paths, [str(p) for p in paths], args.patch, args.batch_size, args.precision)
    for failure in result.failures:  # named and skipped, as `vitkit predict` does: the others are still embedded
        print(f"vitkit embed: {failure.error}", file=sys.stderr)
    if not result.names:
        raise ValueError(f"none of the {len(paths)} images could be decoded; nothing written")
    out = Path(args.out)
    with atomic_write(out) as tmp, open(tmp, "wb") as f:  # np.save(path) would append .npy to other names
        np.save(f, result.features)
    atomic_write_bytes(out.with_suffix(".txt"), "".join(f"{name}\n" for name in result.names).encode())
    print(
        f"wrote {out}: {result.features.shape[0]} images, features {tuple(result.features.shape[1:])} "
        f"({args.precision}); names in {out.with_suffix('.txt')}"
    )
    if result.failures:
        print(
            f"vitkit embed: {len(result.failures)} of {len(paths)} image(s) failed and were left out", file=sys.stderr
        )
    return 1 if result.failures else 0
