"""vitkit plot: training curves (loss, learning rate, validation accuracy, img/s) of a run as a PNG."""

from __future__ import annotations

import argparse

HELP = "draw a run's training curves (loss, lr, val accuracy, img/s) from its metrics.jsonl as a PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by `vitkit train` (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    from ..train.plot import plot_run

    print(f"curves: {plot_run(args.run_dir, args.out)}")
    return 0
