"""CIFAR-10 under a wall-clock budget on this machine's CPU: how good a ViT gets in N minutes.

    .venv/bin/python benchmarks/cifar10_budget.py --minutes 10 --out DIR   # --data ARCHIVE (default below)
    .venv/bin/python benchmarks/cifar10_budget.py --minutes 10 --peer timm --out DIR   # timm's ViT, timm's defaults

Steps: build (or reuse) the decode cache of the archive and report its one-time cost separately; train with the
recipe `vitkit/recipes/cifar10_budget.yaml` (flags override it) under the budget, the clock starting after the data
is loaded; evaluate on the seeded, stratified 10 % of the train split held out from training (the CIFAR-10 test
split stays untouched); save the model. Prints the machine, the versions, the accuracy, and the checkpoint path on
its last line.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from machine import DEFAULT_CIFAR10, cpu_model  # benchmarks/machine.py (this folder is on sys.path)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--data", default=DEFAULT_CIFAR10, help=f"CIFAR-10 train archive (default {DEFAULT_CIFAR10})")
    p.add_argument("--out", default="runs/cifar10_budget")
    p.add_argument("--recipe", default="cifar10_budget", help="recipe name or YAML path")
    p.add_argument("--cache-dir", default=None, help="decode cache folder (default ~/.cache/vitkit)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--patch-drop", type=float, default=None, help="patch dropout rate in training (model_kwargs)")
    p.add_argument(
        "--peer", choices=("timm",), default=None, help="train timm's plain ViT with timm's defaults instead (same "
        "data, split and clock; benchmarks/timm_budget.py)",
    )  # fmt: skip
    p.add_argument("--peer-model", default="vit_tiny_patch16_224", help="timm model name for --peer timm")
    args = p.parse_args()
    if args.peer and args.patch_drop is not None:
        p.error("--patch-drop sets the vitkit model's patch dropout; --peer timm trains timm's defaults, without it")

    import torch
    import torchvision

    import vitkit
    from vitkit.data.sources import load_source
    from vitkit.train import build_config, fit

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, vitkit {vitkit.__version__}"
    )
    print(f"load average before: {load_average()} (other jobs share this CPU)")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        print(f"commit: {commit or 'n/a'}")
    except OSError:
        pass

    # 1. the decode cache: built once (JPEG decoding), later runs read it back
    t = time.perf_counter()
    ds = load_source(args.data, cache_dir=args.cache_dir, progress=not args.no_progress)
    how = "read from cache" if ds.from_cache else "decoded and cached (one-time)"
    print(f"data: {len(ds)} images {how} in {time.perf_counter() - t:.1f} s ({ds.cache_path or 'in memory'})")
    del ds

    # 2. train under the budget, 3. evaluate on the held-out 10 %, save
    cfg = build_config(
        args.recipe,
        data=args.data,
        minutes=args.minutes,
        out=args.out,
        cache_dir=args.cache_dir,
        seed=args.seed,
        progress=False if args.no_progress else None,
        val_split=0.1,
        model_kwargs=None if args.patch_drop is None else {"patch_drop_rate": args.patch_drop},
    )
    if args.peer == "timm":  # the same data, split (the recipe's seed) and clock; timm's model and recipe
        from timm_budget import run_timm_peer

        print(run_timm_peer(args.data, args.peer_model, args.minutes, args.out, cfg.seed, 0.1, args.cache_dir))
        return 0
    print(
        f"recipe: {args.recipe}; budget {args.minutes:g} min; batch {cfg.batch_size}, lr {cfg.lr}, model "
        f"{cfg.model} {cfg.model_kwargs}"
    )
    t = time.perf_counter()
    res = fit(cfg, resume=False)
    wall = time.perf_counter() - t
    print(f"load average after: {load_average()}")
    print(
        f"trained {res.steps} steps = {res.epochs:.2f} epochs in {res.train_seconds:.0f} s of training "
        f"({res.images_per_second:.0f} img/s); fit() wall time incl. data read and final evaluation {wall:.0f} s"
    )
    top1 = "n/a" if res.val_top1 is None else f"{res.val_top1:.2%}"
    print(
        f"held-out 10% (stratified, seed {cfg.seed}, {res.val_raw['n'] if res.val_raw else 0} images): top-1 {top1},"
        f" top-5 {res.val_top5:.2%} ({res.best_weights} weights); curves: vitkit plot {res.out_dir}"
    )
    if res.model_path is not None and res.val_raw:  # the same held-out images, each also seen in several views
        from vitkit.data.sources import stratified_split
        from vitkit.infer.evaluate import evaluate_model

        model = vitkit.from_pretrained(res.model_path)
        ds = load_source(args.data, cache_dir=args.cache_dir, classes=model.labels, progress=False)
        _, val_idx = stratified_split(ds.labels, 0.1, cfg.seed)
        for mode, views in (("flip", "2 views: mirrored"), ("flip-translate", "6 views: mirrored, shifted 1 px")):
            tta = evaluate_model(model, ds, val_idx, tta=mode)
            print(f"held-out 10% with {mode} test-time augmentation ({views}): top-1 {tta.top1:.2%}")
    print(res.model_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
