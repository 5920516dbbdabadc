"""Learning-rate schedule: linear warmup, then cosine decay to a floor, evaluated per optimizer step.

A pure function of the step plus three numbers, so it resumes exactly from a checkpoint and can be re-laid
when a wall-clock budget (`--minutes`) learns how many steps will fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class WarmupCosine:
    """lr(step) = base_lr * (step + 1) / warmup_steps during warmup, then cosine from base_lr to min_lr.

    Args:
        base_lr: peak learning rate, reached at the end of warmup.
        total_steps: optimizer steps in the whole run (the cosine ends here; later steps stay at min_lr).
        warmup_steps: steps of linear warmup (0: start at base_lr).
        min_lr: floor of the cosine.
        warmup_fraction: warm up over this fraction of total_steps instead (kept through re-layouts, so a
            --minutes budget warms up over its share of the steps that fit; before the first lay-out the lr is
            near 0, as at the start of any warmup).
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    warmup_fraction: float | None = None
    anchor_step: int | None = None  # set by a re-layout mid-cosine: the cosine continues from here ...
    anchor_progress: float = 0.0  # ... at this fraction of its way, so the lr never jumps

    def __post_init__(self) -> None:
        if self.warmup_fraction is not None:
            self.warmup_steps = round(self.warmup_fraction * self.total_steps)

    def progress_at(self, step: int) -> float:
        """How far along the cosine `step` is, in [0, 1] (0 during warmup)."""
        start = self.warmup_steps if self.anchor_step is None else self.anchor_step
        frac = min(max(step - start, 0) / max(self.total_steps - start, 1), 1.0)
        return self.anchor_progress + (1.0 - self.anchor_progress) * frac

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        progress = self.progress_at(step)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def relayout(self, total_steps: int, at_step: int | None = None) -> None:
        """Make the cosine end at `total_steps` instead.

        Before the cosine has started (at_step None or still in warmup) the whole schedule is re-laid (warmup kept,
        capped at a quarter of the run). Mid-cosine, the rest of the curve is stretched or squeezed from `at_step`
        on, continuing from the lr reached there: a wall-clock budget can re-estimate as often as it likes.
        """
        if at_step is None or at_step <= self.warmup_steps:
            self.total_steps = max(int(total_steps), 1)
            if self.warmup_fraction is not None:
                self.warmup_steps = round(self.warmup_fraction * self.total_steps)
            self.warmup_steps = min(self.warmup_steps, self.total_steps // 4)
            self.anchor_step, self.anchor_progress = None, 0.0
            return
        self.anchor_progress = self.progress_at(at_step)
        self.anchor_step = int(at_step)
        self.total_steps = max(int(total_steps), at_step + 1)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to `lr` times its `lr_scale` (layer-wise decay puts one there; default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
