"""vitkit explain: heatmaps of where the model looked, drawn over the images as it saw them."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CHECKPOINT_HELP

HELP = "draw attention maps (one layer, rollout, or a class's grad-rollout) over images as PNG, with the prediction"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument(
        "--method",
        choices=("attention", "rollout", "grad-rollout"),
        default="attention",
        help="attention: one layer's map; rollout: attention flow through the layers; grad-rollout: rollout weighted "
        "by the attention's gradient for one class (--class) (default: attention)",
    )
    p.add_argument(
        "--class",
        dest="target",
        metavar="NAME|INDEX",
        help="grad-rollout: the class the map explains, by name or index (default: each image's top class)",
    )
    p.add_argument("--layer", type=int, default=-1, help="block index, negative from the end (default: -1, the last)")
    p.add_argument(
        "--head",
        default=None,
        help="head index, mean, max, min, or all (a per-head grid) (default: mean; all with --keep-mass)",
    )
    p.add_argument("--discard", type=float, default=0.0, help="rollout: fraction of lowest attentions dropped (0.9)")
    p.add_argument(
        "--keep-mass",
        type=float,
        default=None,
        metavar="F",
        help="draw each map as the smallest patch set holding this fraction of its attention, e.g. 0.6 (DINO)",
    )
    p.add_argument(
        "-o",
        "--out",
        default=None,
        help="output PNG (one image) or folder (default: runs/explain/<image>_<method>.png)",
    )
    p.add_argument("--size", type=int, default=320, help="display size of each panel in pixels (default: 320)")
    p.add_argument("--input-size", type=int, nargs="+", metavar="H [W]", help="input size (dynamic-size models)")


def output_paths(images: list[str], out: str | None, method: str) -> list[Path]:
    """-o file.png for a single image; otherwise a folder with one <stem>_<method>.png per image."""
    if out is not None and out.lower().endswith(".png"):
        if len(images) > 1:
            raise ValueError(f"-o {out} names one file but {len(images)} images were given; pass a folder")
        return [Path(out)]
    folder = Path(out or "runs/explain")
    paths, seen = [], set()
    for image in images:
        stem = Path(image).stem or "image"
        name = f"{stem}_{method}.png"
        n = 1
        while name in seen:  # same stem from two folders: number them
            n += 1
            name = f"{stem}_{method}_{n}.png"
        seen.add(name)
        paths.append(folder / name)
    return paths


def run(args: argparse.Namespace) -> int:
    import sys

    from ..files import atomic_write_bytes
    from ..infer.explain import Explainer, figure_png, parse_class, parse_head
    from ..infer.predict import Failure, Predictor

    paths = output_paths(args.images, args.out, args.method)
    size = tuple(args.input_size) if args.input_size else None
    predictor = Predictor(args.checkpoint, input_size=size)
    head = args.head or ("all" if args.keep_mass is not None and args.method == "attention" else "mean")
    target = parse_class(args.target, predictor.labels)
    explainer = Explainer(predictor, args.method, args.layer, parse_head(head), args.discard, args.keep_mass, target)
    print(f"showing: {explainer.description}")
    failed = 0
    for image, path in zip(args.images, paths):
        (result,) = explainer.explain([image], errors="collect")
        if isinstance(result, Failure):
            failed += 1
            print(f"vitkit explain: {result.error}", file=sys.stderr)
            continue
        atomic_write_bytes(path, figure_png(result, args.size))
        print(f"{image}: predicted {result.title} -> {path}")
    return 1 if failed else 0
