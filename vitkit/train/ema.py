"""Exponential moving average of the weights: a smoother model that often evaluates better than the last step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """ema <- d * ema + (1 - d) * weights after every optimizer step, for parameters and float buffers.

    With `warmup`, the decay in use is min(decay, (1 + step) / (10 + step)), so a short run's average is not
    dominated by the random initial weights. Integer buffers (BatchNorm's counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        model_state = model.state_dict()
        ema_f, new_f = [], []
        for name, ema_t in self.module.state_dict().items():
            t = model_state[name].detach()
            if ema_t.dtype.is_floating_point:
                ema_f.append(ema_t)
                new_f.append(t.to(ema_t.dtype))
            else:
                ema_t.copy_(t)
        # ema + (1 - d) * (t - ema) for all float tensors in a few multi-tensor kernels (one lerp per tensor cost
        # ~150 kernel launches per step on a GPU)
        torch._foreach_lerp_(ema_f, new_f, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
