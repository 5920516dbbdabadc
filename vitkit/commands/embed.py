"""vitkit embed: image features from a checkpoint, saved as a .npy array (one row per image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CHECKPOINT_HELP

HELP = "embed images with a checkpoint: pooled features (N, D) or patch features (N, h*w, D) to a .npy file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files or folders (folders: all images inside, sorted)")
    p.add_argument("-o", "--out", required=True, help="output .npy; the image names go to <out>.txt in row order")
    p.add_argument("--patch", action="store_true", help="patch-token features instead of the pooled vector")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..files import atomic_write, atomic_write_bytes
    from ..infer.embed import embed_images, expand_image_paths

    paths = expand_image_paths(args.images)
    feats = embed_images(args.checkpoint, paths, patch=args.patch, batch_size=args.batch_size, precision=args.precision)
    out = Path(args.out)
    with atomic_write(out) as tmp, open(tmp, "wb") as f:  # np.save(path) would append .npy to other names
        np.save(f, feats)
    atomic_write_bytes(out.with_suffix(".txt"), "".join(f"{p}\n" for p in paths).encode())
    print(
        f"wrote {out}: {feats.shape[0]} images, features {tuple(feats.shape[1:])} ({args.precision}); names in "
        f"{out.with_suffix('.txt')}"
    )
    return 0
