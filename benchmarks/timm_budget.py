"""The `--peer timm` arm of benchmarks/cifar10_budget.py: timm's own plain ViT, trained with timm's own defaults,
on vitkit's data path, split and budget clock, so that the two arms differ only in the model and its recipe.

timm's: the model (`timm.create_model(NAME, img_size=<data>, patch_size=4, num_classes=<data>)`); AdamW from
`create_optimizer_v2` with weight decay 0.05 and timm's no-weight-decay rules (1-d parameters and the model's
`no_weight_decay()`); DeiT's learning rate in timm train.py's names (lr_base 5e-4 per lr_base_size 512, scaled
linearly to the batch: 1.25e-4 at 128); `CosineLRScheduler` stepped per update from train.py's warmup_lr 1e-5 over
its 5 warmup epochs to its min_lr 0; `LabelSmoothingCrossEntropy(0.1)`; bf16 autocast; no EMA, no clipping.
vitkit's, shared with the vitkit arm: the decode cache, the seeded stratified held-out split, the batch order, the
pad-4 crop + flip on uint8 batches (normalised with the model's own mean and std), and the `BudgetClock`: it starts
once data and model are ready and keeps 3 % of the budget for the final evaluation.
The budget: the first 3 + 10 steps are timed, then the cosine is laid over the steps that fit; the warmup is capped
at a quarter of those, as vitkit's budget caps its own (five epochs can be more than the whole budget buys). The
run stops when the clock runs out or the cosine ends. No evaluation during training (timm's train.py evaluates every
epoch: leaving that out gives the peer the time).
"""

from __future__ import annotations

from pathlib import Path

import torch

BATCH_SIZE = 128
PATCH_SIZE = 4
LR_BASE, LR_BASE_SIZE = 5e-4, 512  # lr = LR_BASE * batch / LR_BASE_SIZE (DeiT's rule, linear scaling)
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS, WARMUP_LR, MIN_LR = 5, 1e-5, 0.0  # timm train.py's defaults
SMOOTHING = 0.1
SKIP_STEPS, CALIB_STEPS = 3, 10  # steps not timed (first-call set-up), then steps timed to lay the schedule


def lay_schedule(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
    """timm's cosine over `total_steps` updates, warming up from WARMUP_LR over WARMUP_EPOCHS, or over a quarter of
    the updates where that is less (vitkit's budget caps its own warmup so)."""
    from timm.scheduler import CosineLRScheduler

    warmup = min(WARMUP_EPOCHS * steps_per_epoch, total_steps // 4)
    return CosineLRScheduler(
        optimizer, t_initial=max(total_steps, 1), lr_min=MIN_LR, warmup_t=warmup, warmup_lr_init=WARMUP_LR,
        t_in_epochs=False,
    )  # fmt: skip


def held_out_top1(model: torch.nn.Module, loader) -> float:
    """Top-1 on the held-out batches, under the same bf16 autocast as training."""
    model.eval()
    correct = seen = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in loader:
            correct += int((model(x).argmax(dim=-1) == y).sum())
            seen += len(y)
    return correct / max(seen, 1)


def run_timm_peer(
    data: str, name: str, minutes: float, out: str | Path, seed: int, val_fraction: float, cache_dir: str | None
) -> Path:
    """Train timm's `name` for `minutes` on `data`, print the summary lines, save it as a timm Hub folder (which
    `vitkit evaluate` and timm both load); returns that folder."""
    import timm
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models import save_for_hf
    from timm.optim import create_optimizer_v2

    from vitkit.config import PreprocessConfig
    from vitkit.data.loader import BatchLoader
    from vitkit.data.sources import load_source, stratified_split
    from vitkit.data.transforms import AugmentConfig, EvalTransform, TrainTransform
    from vitkit.train.fit import BudgetClock

    ds = load_source(data, cache_dir=cache_dir, progress=False)
    train_idx, val_idx = stratified_split(ds.labels, val_fraction, seed)
    torch.manual_seed(seed)
    model = timm.create_model(name, img_size=ds.image_size, patch_size=PATCH_SIZE, num_classes=ds.num_classes)
    mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
    pre = PreprocessConfig(input_size=ds.image_size, mean=mean, std=std, crop_pct=1.0)
    augment = TrainTransform(AugmentConfig(random_crop_pad=4, hflip=True), pre, ds.num_classes)
    loader = BatchLoader(ds, train_idx, BATCH_SIZE, shuffle=True, seed=seed, drop_last=True, transform=augment)
    if len(loader) == 0:
        raise ValueError(f"{data}: {len(train_idx)} training images make no full batch of {BATCH_SIZE}")
    lr = LR_BASE * BATCH_SIZE / LR_BASE_SIZE
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=WEIGHT_DECAY)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=SMOOTHING)
    schedule = lay_schedule(optimizer, 10**9, len(loader))  # the warmup's start until the pace is known
    total = None
    params = sum(p.numel() for p in model.parameters())
    print(
        f"peer: timm {timm.__version__} {name} (img_size {ds.image_size[0]}, patch {PATCH_SIZE}, {params / 1e6:.2f} M "
        f"parameters); AdamW lr {lr:.3g} (5e-4 x {BATCH_SIZE}/512), wd {WEIGHT_DECAY}, smoothing {SMOOTHING}, "
        f"batch {BATCH_SIZE}, warmup {WARMUP_EPOCHS} epochs from {WARMUP_LR:g}, cosine per update to {MIN_LR:g}"
    )

    clock = BudgetClock(minutes, calib_steps=CALIB_STEPS, skip_steps=SKIP_STEPS)
    step = 0
    model.train()
    while not clock.out_of_time() and (total is None or step < total):
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            schedule.step_update(num_updates=step)
            if total is None and (sec := clock.pace(step)) is not None:
                total = clock.estimate_total(step, sec)
                schedule = lay_schedule(optimizer, total, len(loader))
                schedule.step_update(num_updates=step)
                clock.calibrated = True
                print(
                    f"budget: {sec * 1000:.0f} ms/step measured -> cosine laid over {total} steps "
                    f"(~{total / len(loader):.1f} epochs), warmup {schedule.warmup_t} steps"
                )
            if clock.out_of_time() or (total is not None and step >= total):
                break
    train_seconds = clock.elapsed

    val_loader = BatchLoader(ds, val_idx, 256, shuffle=False, drop_last=False, transform=EvalTransform(pre))
    top1 = held_out_top1(model, val_loader)
    images = step * BATCH_SIZE
    print(
        f"trained {step} steps = {images / len(train_idx):.2f} epochs in {train_seconds:.0f} s of training "
        f"({images / max(train_seconds, 1e-9):.0f} img/s)"
    )
    print(f"held-out {val_fraction:.0%} (stratified, seed {seed}, {len(val_idx)} images): top-1 {top1:.2%}")
    folder = Path(out) / "timm_model"
    as_run = dict(input_size=(3, *ds.image_size), crop_pct=1.0, mean=mean, std=std)  # as trained and evaluated here
    labels = {"label_names": list(ds.classes)}
    save_for_hf(model, folder, model_config=labels, safe_serialization=True, data_config=as_run)
    return folder
