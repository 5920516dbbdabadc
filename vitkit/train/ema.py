"""Exponential moving average of the weights: a smoother model that often evaluates better than the last step."""

from __future__ import annotations

import copy

import torch
from torch import nn


def lerp_state_(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], weight: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """target <- target + weight * (source - target) for the float tensors, in a few multi-tensor kernels (one lerp
    per tensor cost ~150 kernel launches per step on a GPU); integer tensors (BatchNorm's counter) are copied.
    Returns the float tensors of both, in the same order (a source tensor of target's dtype is itself, not a copy).
    """
    target_f, source_f = [], []
    for name, t in target.items():
        src = source[name].detach()
        if t.dtype.is_floating_point:
            target_f.append(t)
            source_f.append(src.to(t.dtype))
        else:
            t.copy_(src)
    torch._foreach_lerp_(target_f, source_f, weight)
    return target_f, source_f


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
        lerp_state_(self.module.state_dict(), model.state_dict(), 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class Lookahead:
    """airbench's lookahead: every `every` optimizer steps a slow copy s of the weights moves toward them,
    s <- s + (1 - d) (w - s), and the weights jump back to it, w <- s. The decay d = `decay` * progress**3
    (progress: steps taken / the schedule's steps), so a run starts as plain training and ends averaging strongly;
    `finish` copies s into the weights once more (d = 1) when training ends.

    Float parameters and buffers are averaged; integer buffers (BatchNorm's counter) are copied into s. Unlike
    ModelEma, which keeps a separate average to evaluate, this one changes the weights training continues from.
    """

    def __init__(self, model: nn.Module, every: int, decay: float):
        if every < 1 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"lookahead needs every >= 1 and 0 <= decay <= 1, got every={every}, decay={decay}")
        self.every, self.decay = every, decay
        self.slow = {name: t.detach().clone() for name, t in model.state_dict().items()}

    def decay_at(self, step: int, total_steps: int) -> float:
        return self.decay * min(step / max(total_steps, 1), 1.0) ** 3

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called once `step` optimizer steps are done: averages and copies back on every `every`-th."""
        if step % self.every == 0:
            self.update(model, self.decay_at(step, total_steps))

    def finish(self, model: nn.Module) -> None:
        """The end of training: the weights become the slow copy."""
        self.update(model, 1.0)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        slow_f, live_f = lerp_state_(self.slow, model.state_dict(), 1.0 - decay)
        torch._foreach_copy_(live_f, slow_f)  # state_dict's tensors share the parameters' storage: w <- s in place

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.slow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.slow.keys() ^ state.keys()
        if missing:
            raise ValueError(f"the checkpoint's lookahead copy does not match the model: {sorted(missing)[:5]}")
        for name, t in state.items():
            self.slow[name].copy_(t)
