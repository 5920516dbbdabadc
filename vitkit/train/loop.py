"""The two plain functions a training run is made of: `train_one_epoch()` and `evaluate()` (MAE's shape).

No Trainer class: `fit.py` wires data, model, optimizer and checkpoints around these two.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import soft_target_cross_entropy
from ..infer.evaluate import evaluate_batches
from .distributed import DistEnv, all_ranks_true
from .ema import ModelEma
from .logging import RunLogger
from .schedule import WarmupCosine, apply_lr


class TrainingDiverged(RuntimeError):
    """The loss was NaN or infinite for too many steps in a row."""


@dataclass
class StepState:
    """Counters that travel in the checkpoint: optimizer steps taken, and the non-finite-loss streak."""

    step: int = 0
    bad_streak: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # wall time spent inside train_one_epoch, summed over resumes


@dataclass
class EpochHooks:
    """Where fit() plugs in: whether to stop now (budget, stop_after_steps), and checkpointing mid-epoch."""

    should_stop: Callable[[int], bool] = lambda step: False
    after_step: Callable[[int], None] = lambda step: None  # called after every optimizer step (checkpoint cadence)
    on_timing: Callable[[int, float], None] = lambda step, seconds: None  # seconds of that step, for budgets
    extra: dict = field(default_factory=dict)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (AMX on CPU, tensor cores on GPU) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy in fp32: soft targets (B, K) from MixUp/CutMix as they are, hard labels (B,) smoothed here."""
    logits = logits.float()
    if targets.ndim == 2:
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def _next_step_batches(batches: Iterator, grad_accum: int) -> list | None:
    """The next optimizer step's `grad_accum` micro-batches, or None at the end of the epoch (a short tail is
    dropped). Pulls nothing more than it returns, so a stop between steps leaves the loader exactly there."""
    group = list(itertools.islice(batches, grad_accum))
    return group if len(group) == grad_accum else None


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    state: StepState,
    *,
    device: torch.device,
    precision: str = "bf16",
    label_smoothing: float = 0.0,
    grad_accum: int = 1,
    clip_grad: float | None = None,
    ema: ModelEma | None = None,
    max_bad_steps: int = 5,
    logger: RunLogger | None = None,
    log_every: int = 10,
    epoch: int = 0,
    hooks: EpochHooks | None = None,
    env: DistEnv | None = None,
) -> dict[str, float]:
    """One pass over `loader` (or until `hooks.should_stop`), one optimizer step per `grad_accum` batches.

    A step whose loss or gradient norm is NaN/Inf is skipped with a warning; after `max_bad_steps` in a row the
    run stops with TrainingDiverged. Under torchrun pass `env`: a NaN loss on any rank then skips the step on
    every rank (the ranks must run the same backward passes, or their gradient all-reduces mismatch and hang).
    Returns {"loss": mean loss, "images": images, "seconds": wall time}.
    """
    hooks = hooks or EpochHooks()
    distributed = env is not None and env.distributed
    model.train()
    loss_sum, loss_n, images = 0.0, 0, 0
    t_epoch = time.perf_counter()
    window_t, window_imgs, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
    batches = iter(loader)
    while not hooks.should_stop(state.step):
        micro = _next_step_batches(batches, grad_accum)
        if micro is None:
            break
        t_step = time.perf_counter()
        lr = schedule.lr_at(state.step)
        apply_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        step_loss, finite, n_img = 0.0, True, 0
        step_loss_t = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
        for x, y in micro:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(precision, device):
                logits = model(x)  # (B, K)
            loss = compute_loss(logits, y, label_smoothing) / grad_accum
            # several ranks: one rank's NaN must skip backward on every rank, decided before it (a collective);
            # one process: backward runs anyway and the single check below catches the NaN it leaves
            if distributed and not all_ranks_true(torch.isfinite(loss.detach()), env):
                finite = False
                break
            loss.backward()
            step_loss_t += loss.detach().float()
            n_img += x.shape[0]
        grad_norm = None
        if finite:
            if clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            # ONE host sync per step (it was three: the loss check, loss.item(), the norm check): on a GPU each sync
            # stalls the host until the queue drains, so it cannot launch the next step while this one runs
            if grad_norm is not None and hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, replicated
                grad_norm = grad_norm.full_tensor()
            checks = torch.stack([step_loss_t, grad_norm.float()]) if grad_norm is not None else step_loss_t[None]
            values = checks.tolist()
            step_loss = values[0]
            finite = all(math.isfinite(v) for v in values)
        if not finite:
            state.bad_streak += 1
            optimizer.zero_grad(set_to_none=True)
            warnings.warn(
                f"step {state.step}: non-finite loss or gradient; step skipped "
                f"({state.bad_streak}/{max_bad_steps} in a row)",
                stacklevel=2,
            )
            if state.bad_streak >= max_bad_steps:
                raise TrainingDiverged(
                    f"the loss was NaN/Inf for {state.bad_streak} steps in a row at step {state.step} (lr {lr:.3g}); "
                    "lower --lr, raise --warmup-epochs, set --clip-grad, or use --precision fp32"
                )
            continue
        state.bad_streak = 0
        optimizer.step()
        if ema is not None:
            ema.update(getattr(model, "module", model), state.step)  # DDP keeps the model in .module
        state.step += 1
        state.images_seen += n_img
        loss_sum, loss_n, images = loss_sum + step_loss, loss_n + 1, images + n_img
        window_imgs, window_loss, window_n = window_imgs + n_img, window_loss + step_loss, window_n + 1
        hooks.on_timing(state.step, time.perf_counter() - t_step)
        if logger is not None:
            logger.step(1, loss=step_loss, lr=lr)
            if state.step % log_every == 0:
                dt = time.perf_counter() - window_t
                ips = window_imgs / max(dt, 1e-9)
                logger.log(
                    "train",
                    state.step,
                    epoch=epoch,
                    loss=window_loss / window_n,
                    lr=lr,
                    img_per_s=ips,
                    grad_norm=None if grad_norm is None else float(grad_norm),
                )
                if logger.bar is not None:
                    logger.bar.set_postfix(loss=f"{window_loss / window_n:.3f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
                window_t, window_imgs, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
        hooks.after_step(state.step)
    seconds = time.perf_counter() - t_epoch
    state.train_seconds += seconds
    return {"loss": loss_sum / max(loss_n, 1) if loss_n else math.nan, "images": images, "seconds": seconds}


def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: torch.device = torch.device("cpu"),
    precision: str = "bf16",
    topk: int = 5,
) -> dict:
    """Accuracy of `model` on (x, y) batches: {"top1", "top5", "loss", "n", "per_class", "confusion" (K, K)}.

    The counting lives in `vitkit.infer.evaluate.evaluate_batches`, shared with `vitkit evaluate`.
    """
    return evaluate_batches(model, loader, num_classes, device=device, precision=precision, topk=topk)
