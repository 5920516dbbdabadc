"""vitkit plot: training curves (loss, learning rate, validation accuracy, img/s) of a run as a PNG; for a
pretraining run also its reconstructions (original / masked / reconstructed images)."""

from __future__ import annotations

import argparse

HELP = "draw a run's training curves (loss, lr, val accuracy, img/s) from its metrics.jsonl as a PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by `vitkit train` or `vitkit pretrain` (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path of the curves (default RUN_DIR/curves.png; reconstructions: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    from ..pretrain.run import draw_from_checkpoint, is_pretraining_run
    from ..train.plot import plot_run

    print(f"curves: {plot_run(args.run_dir, args.out)}")
    if is_pretraining_run(args.run_dir):
        print(f"reconstructions: {draw_from_checkpoint(args.run_dir)}")
    return 0
