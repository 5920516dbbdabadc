"""Calibration: the range of every quantized layer's input over a few hundred images, for static activations.

Each layer's uint8 grid covers the smallest and largest value its input took over the calibration images (a min/max
observer). The ranges are read from the float model, all tokens of every block (`forward_features`), under the
same bf16 autocast the int8 model's other layers run in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .convert import LINEARS, Ranges, quantize_model

DEFAULT_IMAGES = 256  # enough for a stable min/max at ViT widths; calibration costs a few seconds on 2 cores


class RangeObserver:
    """The running (min, max) of every tensor it sees."""

    def __init__(self) -> None:
        self.lo, self.hi = float("inf"), float("-inf")

    def __call__(self, module: nn.Module, args: tuple) -> None:  # a forward pre-hook: args[0] is the layer input
        lo, hi = torch.aminmax(args[0].detach())
        self.lo, self.hi = min(self.lo, lo.item()), max(self.hi, hi.item())

    @property
    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("a quantized layer saw no input during calibration")
        return self.lo, self.hi


@torch.no_grad()
def observe_ranges(model: nn.Module, batches: Iterable[torch.Tensor]) -> Ranges:
    """Run `model` (float, eval) over image batches (B, C, H, W) float32 and return each quantized layer's input
    range, keyed by its dotted name ("blocks.3.mlp.fc1")."""
    observers: dict[str, RangeObserver] = {}
    handles = []
    for i, blk in enumerate(model.blocks):
        for parent, name in LINEARS:
            key = f"blocks.{i}.{parent}.{name}"
            observers[key] = RangeObserver()
            handles.append(getattr(getattr(blk, parent), name).register_forward_pre_hook(observers[key]))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for x in batches:
            with torch.autocast(device.type, torch.bfloat16):
                model.forward_features(x.to(device))  # every token of every block (no shortened last block)
            seen += len(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("calibration needs at least one image")
    return {key: obs.range for key, obs in observers.items()}


def calibration_indices(n_total: int, images: int, exclude: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """`images` indices drawn at random (seeded) from 0..n_total-1, none of them in `exclude`."""
    pool = np.arange(n_total) if exclude is None else np.setdiff1d(np.arange(n_total), exclude)
    if images < 1:
        raise ValueError(f"the calibration image count must be positive, got {images}")
    if not len(pool):
        raise ValueError("no images left to calibrate with")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(pool)[:images])


def calibration_batches(
    model: nn.Module,
    source: str,
    images: int = DEFAULT_IMAGES,
    *,
    batch_size: int = 32,
    val_split: float | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[Iterator[torch.Tensor], dict]:
    """Float batches of `images` images from a data source (any `--data` spec: folder, tar, CSV, cifar10, ...), with
    the model's own preprocessing, and what to record about them.

    val_split: leave out the stratified held-out fraction a training run with this split (and `seed`) used, so that
    an evaluation on that split never sees its calibration images.
    """
    from ..data.loader import BatchLoader
    from ..data.sources import load_source, stratified_split
    from ..data.transforms import build_eval_transform

    ds = load_source(source, cache_dir=cache_dir, progress=progress, unlabelled_ok=True)
    exclude = stratified_split(ds.labels, val_split, seed)[1] if val_split else None
    indices = calibration_indices(len(ds), images, exclude, seed)
    transform = build_eval_transform(model.preprocess, model.cfg.in_chans)
    loader = BatchLoader(ds, indices, batch_size, shuffle=False, drop_last=False, transform=transform)
    record = {"source": ds.source or source, "images": int(len(indices)), "observer": "min/max", "seed": seed}
    if val_split:
        record["val_split_left_out"] = val_split
    return (x for x, _ in loader), record


def quantize_calibrated(
    model: nn.Module,
    source: str,
    images: int = DEFAULT_IMAGES,
    *,
    batch_size: int = 32,
    val_split: float | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """The int8 model with static activations calibrated on `images` images of `source` (calibration_batches)."""
    batches, record = calibration_batches(
        model, source, images, batch_size=batch_size, val_split=val_split, seed=seed, cache_dir=cache_dir,
        progress=progress,
    )  # fmt: skip
    return quantize_model(model, observe_ranges(model, batches), calibration=record, inplace=inplace)
