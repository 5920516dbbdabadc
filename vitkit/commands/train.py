"""vitkit train: train a ViT on your images (folder, .tar(.gz), .csv, digits, cifar10/100) with a modern recipe.

The flags are generated from the training options (vitkit/train/recipe.py, vitkit/train/options.py).
"""

from __future__ import annotations

import argparse
import sys

HELP = "train a ViT on an image folder / archive / CSV / built-in set; resumable, logged, budgeted"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.options import add_training_arguments
    from . import add_resume_argument

    add_training_arguments(p)
    add_resume_argument(p)


def run(args: argparse.Namespace) -> int:
    from ..train import fit
    from ..train.options import config_from_args
    from . import run_training_job

    cfg = config_from_args(args)
    if not args.out and args.resume:
        print("vitkit train: --resume continues the run in --out; pass --out RUN_DIR", file=sys.stderr)
        return 2
    res = run_training_job("train", lambda: fit(cfg, resume=args.resume))
    if isinstance(res, int):
        return res
    if res.val_top1 is not None:
        print(f"val top-1 {res.val_top1:.2%}, top-5 {res.val_top5:.2%} ({res.best_weights} weights)")
    elif res.val_summary:  # another task's numbers (multilabel: mAP and F1)
        shown = ", ".join(f"{k} {v:.2%}" for k, v in res.val_summary.items())
        print(f"val {shown} ({res.best_weights} weights)")
    print(f"metrics: {res.out_dir / 'metrics.jsonl'} (plot: vitkit plot {res.out_dir})")
    print(f"model: {res.model_path}")
    return 0
