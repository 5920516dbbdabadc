"""Transfer, measured: a ViT pretrained on CIFAR-10 classes 0-4, fine-tuned on classes 5-9 with 10 % of their labels,
against the same ViT trained from scratch on the same labelled images for the same wall-clock time.

    .venv/bin/python benchmarks/transfer_demo.py                 # ~7 min on 2 cores
    ... --pretrain-seconds 300 --train-seconds 90                # longer budgets

Splits (seeded, stratified): classes 5-9 lose 10 % of their images to a validation set that neither run trains
on; 10 % of the rest (2,250 images) are the labelled set both runs train on. Classes 0-4 (all 25,000 images)
are only seen by the pretraining. Both target runs use the same model, augmentation (pad-4 crop + flip, label
smoothing 0.1), AdamW, warmup + cosine laid over the steps that fit the budget, bf16 autocast; the fine-tune
starts from the pretrained encoder with a fresh zero head and layer-wise lr decay. Prints machine, versions,
both accuracies and their difference; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from machine import DEFAULT_CIFAR10, cpu_model  # benchmarks/machine.py (this folder is on sys.path)

import vitkit  # noqa: E402
from vitkit.data.loader import BatchLoader  # noqa: E402
from vitkit.data.sources import ImageArrayDataset, load_source, stratified_split  # noqa: E402
from vitkit.data.transforms import AugmentConfig, build_eval_transform, build_train_transform  # noqa: E402
from vitkit.interop.transfer import prepare_for_transfer  # noqa: E402
from vitkit.train.loop import EpochHooks, StepState, evaluate, train_one_epoch  # noqa: E402
from vitkit.train.optim import build_optimizer  # noqa: E402
from vitkit.train.schedule import WarmupCosine  # noqa: E402


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads; Python "
        f"{platform.python_version()}, torch {torch.__version__}, vitkit {vitkit.__version__}"
    )


def subset(ds: ImageArrayDataset, labels: np.ndarray, classes: list[str]) -> ImageArrayDataset:
    """The same image array under new labels (only the indices passed to a loader are ever read)."""
    return ImageArrayDataset(images=ds.images, labels=labels, classes=classes, source=ds.source)


def train_for(
    model: vitkit.VisionTransformer,
    ds: ImageArrayDataset,
    idx: np.ndarray,
    seconds: float,
    lr: float,
    layer_decay: float | None,
    batch_size: int,
    seed: int,
) -> dict:
    """Train with vitkit's loop for `seconds` of wall time; the cosine is laid over the steps measured to fit."""
    aug = AugmentConfig(label_smoothing=0.1)
    tf = build_train_transform(aug, model.preprocess, len(ds.classes), model.cfg.in_chans)
    loader = BatchLoader(ds, idx, batch_size, seed=seed, transform=tf)
    optimizer = build_optimizer(model, lr, weight_decay=0.05, layer_decay=layer_decay)
    schedule = WarmupCosine(lr, total_steps=10**9, warmup_steps=200, min_lr=lr * 0.01)
    state = StepState()
    t0 = time.perf_counter()
    step_times: list[float] = []

    def on_timing(step: int, sec: float) -> None:
        step_times.append(sec)
        if len(step_times) == 10:  # calibrate once: warmup 5 % of the steps that fit, cosine over the rest
            left = seconds - (time.perf_counter() - t0)
            total = step + int(left / statistics.median(step_times[2:]))
            schedule.total_steps, schedule.warmup_steps = max(total, 1), max(total // 20, 1)

    hooks = EpochHooks(should_stop=lambda step: time.perf_counter() - t0 >= seconds, on_timing=on_timing)
    epoch = 0
    while time.perf_counter() - t0 < seconds:
        loader.set_epoch(epoch)
        train_one_epoch(
            model, loader, optimizer, schedule, state, device=torch.device("cpu"), precision="bf16",
            label_smoothing=aug.label_smoothing, clip_grad=1.0, hooks=hooks, epoch=epoch,
        )  # fmt: skip
        epoch += 1
    elapsed = time.perf_counter() - t0
    return {
        "steps": state.step,
        "images": state.images_seen,
        "epochs": state.images_seen / len(idx),
        "seconds": elapsed,
    }


def accuracy(model: vitkit.VisionTransformer, ds: ImageArrayDataset, idx: np.ndarray) -> float:
    loader = BatchLoader(ds, idx, 500, shuffle=False, drop_last=False, transform=build_eval_transform(model.preprocess))
    return evaluate(model, loader, len(ds.classes), precision="bf16")["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_CIFAR10, help=f"CIFAR-10 train archive (default {DEFAULT_CIFAR10})")
    p.add_argument("--pretrain-seconds", type=float, default=240.0)
    p.add_argument("--train-seconds", type=float, default=60.0, help="budget of each target run (fine-tune, scratch)")
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="pretraining and from-scratch peak lr")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/transfer_demo")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")

    t = time.perf_counter()
    ds = load_source(args.data, progress=False)
    print(f"data: {ds.source}: {len(ds)} images, decode cache {'read' if ds.from_cache else 'built'} in "
          f"{time.perf_counter() - t:.1f} s")  # fmt: skip
    labels = np.asarray(ds.labels)
    src_classes, tgt_classes = ds.classes[:5], ds.classes[5:]
    src = subset(ds, labels, src_classes)  # classes 0-4 keep their labels
    src_idx = np.flatnonzero(labels < 5)
    tgt = subset(ds, labels - 5, tgt_classes)  # classes 5-9 become 0-4
    tgt_all = np.flatnonzero(labels >= 5)
    pool, val = stratified_split(labels[tgt_all], 0.1, args.seed)
    pool, val = tgt_all[pool], tgt_all[val]
    _, labelled = stratified_split(labels[pool], args.label_fraction, args.seed + 1)
    labelled = pool[labelled]
    print(f"split: pretrain {len(src_idx)} images of {src_classes}; target {tgt_classes}: {len(labelled)} labelled "
          f"({args.label_fraction:.0%} of {len(pool)}), {len(val)} held-out validation images")  # fmt: skip

    arch = dict(embed_dim=args.dim, depth=args.depth, num_heads=max(args.dim // 64, 1), num_classes=5)
    torch.manual_seed(args.seed)
    pre_model = vitkit.create_model("vit_cifar_patch4_32", **arch)
    n_params = sum(q.numel() for q in pre_model.parameters())
    print(f"model: ViT patch 4, D={args.dim}, depth {args.depth}, {n_params:,} parameters")
    r_pre = train_for(pre_model, src, src_idx, args.pretrain_seconds, args.lr, None, args.batch_size, args.seed)
    pre_model.labels = list(src_classes)
    ckpt = pre_model.save(out / "pretrained_classes0-4.safetensors")
    print(f"pretrain: {r_pre['steps']} steps, {r_pre['epochs']:.2f} epochs in {r_pre['seconds']:.0f} s -> {ckpt}")

    torch.manual_seed(args.seed)
    ft = prepare_for_transfer(ckpt, num_classes=5, labels=list(tgt_classes))
    r_ft = train_for(ft, tgt, labelled, args.train_seconds, args.finetune_lr, args.layer_decay, args.batch_size,
                     args.seed)  # fmt: skip
    torch.manual_seed(args.seed)
    scratch = vitkit.create_model("vit_cifar_patch4_32", **arch)
    r_sc = train_for(scratch, tgt, labelled, args.train_seconds, args.lr, None, args.batch_size, args.seed)
    acc_ft, acc_sc = accuracy(ft, tgt, val), accuracy(scratch, tgt, val)
    print(f"fine-tuned : {acc_ft:.2%} on {len(val)} held-out images of classes 5-9 "
          f"({r_ft['steps']} steps, {r_ft['epochs']:.1f} epochs, {r_ft['seconds']:.0f} s)")  # fmt: skip
    print(f"from scratch: {acc_sc:.2%} on the same images ({r_sc['steps']} steps, {r_sc['epochs']:.1f} epochs, "
          f"{r_sc['seconds']:.0f} s)")  # fmt: skip
    print(f"transfer gain: {100 * (acc_ft - acc_sc):+.1f} points (ratio {acc_ft / max(acc_sc, 1e-9):.2f}x)")
    print(json.dumps({
        "finetuned_top1": round(acc_ft, 4), "scratch_top1": round(acc_sc, 4), "val_images": int(len(val)),
        "labelled_images": int(len(labelled)), "pretrain_seconds": round(r_pre["seconds"], 1),
        "train_seconds": args.train_seconds, "finetune_steps": r_ft["steps"], "scratch_steps": r_sc["steps"],
        "pretrain_steps": r_pre["steps"], "params": n_params,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
