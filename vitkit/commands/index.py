"""vitkit index: embed a gallery of images into a search index (`vitkit search` looks images up in it)."""

from __future__ import annotations

import argparse
import sys

from . import CHECKPOINT_HELP

HELP = "embed a gallery into a search index: L2-normalised pooled features, names, labels (for vitkit search)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument(
        "sources",
        nargs="+",
        help="image files or folders (a folder of class folders gives labels), or one dataset: .tar, .csv, digits...",
    )
    p.add_argument("-o", "--out", required=True, help="the index: NAME -> NAME.safetensors + NAME.json (+ NAME.faiss)")
    p.add_argument(
        "--engine",
        choices=("auto", "exact", "faiss"),
        default="auto",
        help="faiss: also build a faiss HNSW graph for approximate search; auto: when over 100k images and faiss "
        "is installed (default)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--cache-dir", help="decode cache folder (dataset sources)")


def run(args: argparse.Namespace) -> int:
    from ..infer.retrieval import build_index

    index, failures = build_index(
        args.checkpoint, args.sources, batch_size=args.batch_size, precision=args.precision, cache_dir=args.cache_dir
    )
    for failure in failures:  # named and left out, as `vitkit predict` does
        print(f"vitkit index: {failure.error}", file=sys.stderr)
    files = index.save(args.out, engine=args.engine)
    labels = f", {len(index.classes)} classes" if index.labels is not None else ", no labels"
    graph = f" + {files.graph}" if files.graph.is_file() else ""
    print(f"wrote {files.tensors} + {files.sidecar}{graph}: {len(index)} images, {index.vectors.shape[1]}-d{labels}")
    if failures:
        print(f"vitkit index: {len(failures)} image(s) could not be read and were left out", file=sys.stderr)
    return 1 if failures else 0
