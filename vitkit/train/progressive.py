"""Progressive resizing: train the early steps on smaller images, the last ones at the model's input size.

Small images make early steps cheap while the model learns coarse features (fast.ai's DAWNBench recipe); ending at
the full size means the model is trained at the size it is evaluated at (FixRes: a train/test size gap costs
accuracy). Each batch is made at the model's input size by the usual training transform, then shrunk on the batch,
so the augmentation and the data order are those of a run without it.

The size is a pure function of the step and the schedule's total steps, so a resumed run picks the same size at
every step without new checkpoint state; under a `--minutes` budget the switches move with the re-laid schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ViTConfig
from .schedule import WarmupCosine

SizeSteps = tuple[tuple[float, int], ...]  # ((fraction of the schedule's steps, side in px), ...), fractions rising


def parse_size_step(text: str) -> tuple[float, int]:
    """A command-line `FRAC:PX` (e.g. `0.5:32`) -> (0.5, 32)."""
    try:
        frac, side = text.split(":")
        return float(frac), int(side)
    except ValueError:
        raise ValueError(
            f"expected FRAC:PX (from this fraction of the steps, this side in px), e.g. 0.5:32; got {text!r}"
        ) from None


def normalise_size_steps(value: Any) -> SizeSteps | None:
    """Recipe, flag or stored value ([[0.0, 24], [0.5, 32]], ["0:24", "0.5:32"]) -> ((0.0, 24), (0.5, 32)), checked:
    the first fraction 0, fractions rising within [0, 1), sides positive integers. None or empty: off."""
    if not value:
        return None
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"progressive_sizes must be a list of [fraction, side] pairs, got {value!r}")
    steps = []
    for item in value:
        if isinstance(item, str):
            item = parse_size_step(item)
        if not isinstance(item, Sequence) or len(item) != 2 or isinstance(item[1], bool):
            raise ValueError(f"progressive_sizes: each entry is [fraction of the steps, side in px], got {item!r}")
        frac, side = float(item[0]), item[1]
        if isinstance(side, float) and side.is_integer():
            side = int(side)
        if not isinstance(side, int) or side <= 0:
            raise ValueError(f"progressive_sizes: a side is a positive whole number of pixels, got {item[1]!r}")
        steps.append((frac, side))
    fracs = [f for f, _ in steps]
    if fracs[0] != 0.0 or any(b <= a for a, b in zip(fracs, fracs[1:])) or fracs[-1] >= 1.0:
        raise ValueError(
            f"progressive_sizes: the fractions must start at 0 and rise within [0, 1) (from each fraction of the "
            f"schedule's steps on, train at its side), got {fracs}"
        )
    return tuple(steps)


def check_size_steps(steps: SizeSteps, model_cfg: ViTConfig) -> None:
    """Refuse sizes the model cannot take: each a multiple of the patch size, the last the model's input size (the
    run ends at the size it is evaluated and saved at)."""
    (H, W), (ph, pw) = model_cfg.img_size, model_cfg.patch_size
    bad = [side for _, side in steps if side % ph or side % pw]
    if bad:
        raise ValueError(f"progressive_sizes: {bad} px are not multiples of the model's patch size {ph}x{pw}")
    if steps[-1][1] != H or H != W:
        raise ValueError(
            f"progressive_sizes must end at the model's input size, a square: the model takes {H}x{W}, the last "
            f"size is {steps[-1][1]} px"
        )


def size_at(steps: SizeSteps, step: int, total_steps: int) -> int:
    """The side to train `step` at: that of the last entry whose fraction of `total_steps` the step has reached."""
    progress = step / max(total_steps, 1)
    return next(side for frac, side in reversed(steps) if progress >= frac)


class ProgressiveResize:
    """(batch, step) -> the batch shrunk to the step's size (bilinear with antialiasing), or unchanged at full size.

    Holds the run's schedule, whose `total_steps` a `--minutes` budget re-lays: the switches follow it.
    """

    def __init__(self, steps: SizeSteps, schedule: WarmupCosine):
        self.steps, self.schedule = steps, schedule

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        side = size_at(self.steps, step, self.schedule.total_steps)
        if x.shape[-2:] == (side, side):
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
