"""Label efficiency: MAE pretraining on all the images, then fine-tuning on 10 % of the labels, against the best
supervised recipe trained from scratch on the same 10 % for the same total time.

    .venv/bin/python benchmarks/label_efficiency.py                         # P = 25 + F = 15 minutes, then 40
    .venv/bin/python benchmarks/label_efficiency.py --pretrain-minutes 60 --finetune-minutes 20 --json --out FILE

Splits (seeded, stratified, the same in every step): `--val-split` (0.1) of the archive is held out and judged on;
of the rest, `--labels-fraction` (0.1) keeps its labels. Arm A: `vitkit pretrain --method mae` on every training
image (labels unused; the held-out images are held out of pretraining too) for P minutes, then `vitkit finetune`
of that encoder on the labelled images for F minutes. Arm B: `vitkit train --recipe cifar10_budget` (the
conv-tokenizer recipe, vitkit's best supervised one on CIFAR-10) from scratch on the labelled images for P + F
minutes. Both final models are then evaluated by `vitkit evaluate` on the held-out images. Every step runs as the
CLI command a user would type (printed), each budget's clock starting after its data is loaded. Prints the
machine, the versions and both top-1; the last line is one JSON object with `--json`; `--out FILE` appends the run
to a JSON Lines results file (benchmarks/machine.py `append_record`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import DEFAULT_CIFAR10, append_record, cpu_model, git_commit  # benchmarks/machine.py

TARGET_POINTS = 8.0  # issue 20: arm A >= arm B + 8 points at P + F = 40 minutes on the project's CPU
TARGET_MINUTES = 40.0
# Arm A's fine-tuning gets the augmentation and weight averaging of arm B's recipe (cifar10_budget.yaml), so that
# the arms differ in their start (MAE encoder vs random) and model, not in the regularisation of the labelled part.
FINETUNE_ARGS = "--crop-pad 4 --flip --label-smoothing 0.1 --ema-decay 0.998"


def vitkit_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "vitkit", *map(str, args)]


def run_step(name: str, cmd: list[str]) -> float:
    """Run one CLI step with its output passed through; its wall seconds. A failed step ends the benchmark."""
    print(f"\n=== {name}: {shlex.join(['vitkit', *cmd[3:]])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit code {done.returncode}); command: {shlex.join(cmd)}")
    return time.perf_counter() - start


def evaluate_top1(model_dir: Path, data: str, val_split: float, seed: int, cache_dir: list[str]) -> float:
    """Top-1 of a run's saved model on the held-out images (`vitkit evaluate --json`, its last line)."""
    cmd = vitkit_command("evaluate", model_dir, "--data", data, "--val-split", val_split, "--seed", seed, "--json")
    cmd += cache_dir
    print(f"\n=== evaluate: {shlex.join(['vitkit', *cmd[3:]])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"evaluating {model_dir} failed: {done.stderr.strip()[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["top1"])


def split_sizes(data: str, val_split: float, labels_fraction: float, seed: int, cache_dir: str | None) -> dict:
    """Decode (or read back) the data once, before any clock starts; the sizes of the three parts."""
    from vitkit.data.sources import load_source, stratified_split, stratified_subset

    start = time.perf_counter()
    ds = load_source(data, cache_dir=cache_dir, progress=False)
    train_idx, val_idx = stratified_split(ds.labels, val_split, seed)
    labelled = stratified_subset(ds.labels[train_idx], labels_fraction, seed)
    how = "read from the decode cache" if ds.from_cache else "decoded and cached (one-time)"
    print(f"data: {ds.source}: {len(ds)} images {how} in {time.perf_counter() - start:.1f} s")
    return {
        "images": len(ds),
        "classes": len(ds.classes),
        "val_images": len(val_idx),
        "pretrain_images": len(train_idx),
        "labelled_images": len(labelled),
    }


def versions() -> dict:
    import torch

    import vitkit

    return {"python": platform.python_version(), "torch": torch.__version__, "vitkit": vitkit.__version__}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_CIFAR10, help=f"labelled images (default {DEFAULT_CIFAR10})")
    p.add_argument("--pretrain-minutes", type=float, default=25.0, help="P: MAE pretraining budget (default 25)")
    p.add_argument("--finetune-minutes", type=float, default=15.0, help="F: fine-tuning budget (default 15)")
    p.add_argument("--labels-fraction", type=float, default=0.1, help="labels kept of the training split (0.1)")
    p.add_argument("--val-split", type=float, default=0.1, help="held-out fraction judged on (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and of every run (default 0)")
    p.add_argument(
        "--scratch-recipe",
        default="cifar10_budget",
        help="arm B's recipe (default cifar10_budget; 'none': vitkit train's defaults, e.g. for --data digits)",
    )
    p.add_argument("--pretrain-args", default="", help="more `vitkit pretrain` flags, e.g. '--model ... --epochs'")
    p.add_argument(
        "--finetune-args", default=FINETUNE_ARGS, help=f"`vitkit finetune` flags (default '{FINETUNE_ARGS}')"
    )
    p.add_argument("--scratch-args", default="", help="more `vitkit train` flags for arm B")
    p.add_argument(
        "--arms", choices=("both", "a", "b"), default="both", help="run both arms (default), or one (levers of one arm)"
    )
    p.add_argument("--workdir", default="runs/label_efficiency", help="run folders (its arm folders are replaced)")
    p.add_argument("--cache-dir", default=None, help="decode cache folder (default ~/.cache/vitkit)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--out", default=None, help="append the run to this JSON Lines file (e.g. results.jsonl)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    work = Path(args.workdir)
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    split = ["--val-split", args.val_split, "--seed", args.seed]
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores; commit {git_commit()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    sizes = split_sizes(args.data, args.val_split, args.labels_fraction, args.seed, args.cache_dir)
    print(
        f"split (seed {args.seed}): {sizes['val_images']} held out; MAE pretrains on {sizes['pretrain_images']}; "
        f"{sizes['labelled_images']} labelled ({args.labels_fraction:.0%} of them, stratified)"
    )
    run_a, run_b = args.arms in ("both", "a"), args.arms in ("both", "b")
    steps = (["mae", "finetune"] if run_a else []) + (["scratch"] if run_b else [])  # the run folders
    for step in steps:  # a benchmark starts afresh: a leftover last.ckpt would be resumed
        shutil.rmtree(work / step, ignore_errors=True)

    pretrain = vitkit_command(
        "pretrain", "--method", "mae", "--data", args.data, "--out", work / "mae", "--minutes", args.pretrain_minutes,
        *split, "--no-progress", *cache, *shlex.split(args.pretrain_args),
    )  # fmt: skip
    finetune = vitkit_command(
        "finetune", "--from", work / "mae" / "model.safetensors", "--data", args.data, "--out", work / "finetune",
        "--minutes", args.finetune_minutes, "--labels-fraction", args.labels_fraction, *split, "--no-progress",
        *cache, *shlex.split(args.finetune_args),
    )  # fmt: skip
    recipe = [] if args.scratch_recipe.lower() == "none" else ["--recipe", args.scratch_recipe]
    scratch = vitkit_command(
        "train", *recipe, "--data", args.data, "--out", work / "scratch",
        "--minutes", args.pretrain_minutes + args.finetune_minutes, "--labels-fraction", args.labels_fraction,
        *split, "--no-progress", *cache, *shlex.split(args.scratch_args),
    )  # fmt: skip
    seconds, top1 = {}, {}
    if run_a:
        seconds["pretrain"] = run_step("arm A, MAE pretraining", pretrain)
        seconds["finetune"] = run_step("arm A, fine-tuning", finetune)
    if run_b:
        seconds["scratch"] = run_step("arm B, from scratch", scratch)
    for arm, folder in (("a", "finetune"), ("b", "scratch")):
        if folder in steps:
            top1[arm] = evaluate_top1(work / folder, args.data, args.val_split, args.seed, cache)
    top1_a, top1_b = top1.get("a"), top1.get("b")

    total = args.pretrain_minutes + args.finetune_minutes
    print(f"\nheld-out top-1 on {sizes['val_images']} images ({sizes['labelled_images']} labelled training images):")
    if run_a:
        print(f"  arm A  MAE {args.pretrain_minutes:g} min + fine-tune {args.finetune_minutes:g} min : {top1_a:.2%}")
    arm_b = "vitkit train's defaults" if not recipe else f"recipe {args.scratch_recipe}"
    if run_b:
        print(f"  arm B  {arm_b}, from scratch {total:g} min : {top1_b:.2%}")
    gain = target_met = None
    if run_a and run_b:
        gain = 100 * (top1_a - top1_b)
        at_target = abs(total - TARGET_MINUTES) < 1e-9
        target_met = gain >= TARGET_POINTS if at_target else None
        print(f"  A - B: {gain:+.1f} points", end="")
        if at_target:
            verdict = "met" if target_met else "not met"
            print(f"; target A >= B + {TARGET_POINTS:g} at {TARGET_MINUTES:g} min: {verdict}")
        else:
            print(f" (the target is stated at P + F = {TARGET_MINUTES:g} min)")
    figures = {
        "data": args.data,
        **sizes,
        "labels_fraction": args.labels_fraction,
        "val_split": args.val_split,
        "seed": args.seed,
        "pretrain_minutes": args.pretrain_minutes,
        "finetune_minutes": args.finetune_minutes,
        "arm_a_top1": None if top1_a is None else round(top1_a, 4),
        "arm_b_top1": None if top1_b is None else round(top1_b, 4),
        "gain_points": None if gain is None else round(gain, 2),
        "target_met": target_met,
        "wall_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "commands": {
            step: shlex.join(["vitkit", *cmd[3:]])
            for step, cmd in (("pretrain", pretrain), ("finetune", finetune), ("scratch", scratch))
            if step in seconds
        },
        "versions": versions(),
    }
    if args.out:
        print(f"appended to {append_record(args.out, 'label_efficiency', figures)}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
