"""vitkit demo: train a small ViT on scikit-learn's digits, report, predict, and draw attention maps."""

from __future__ import annotations

import argparse

HELP = "train a small ViT on scikit-learn's built-in digits (~1 min on 2 CPU cores) and show what it learned"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's tuned value)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    kw = {} if args.epochs is None else {"epochs": args.epochs}
    run_demo(args.out, seed=args.seed, **kw)
    return 0
