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
from functools import partial

import torch
from torch import nn

from ..data.preprocess import to_device
from ..infer.evaluate import evaluate_batches
from ..tasks import Task
from ..tasks.classify import cross_entropy
from .distributed import DistEnv, all_ranks_true
from .ema import Lookahead, ModelEma
from .logging import RunLogger
from .schedule import WarmupCosine, apply_lr

# (what the model returned, the targets) -> the loss to minimise: classification's cross-entropy by default; an
# objective whose module computes its own loss (masked-autoencoder pretraining) returns it from the output
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (images, optimizer step) -> the images the model sees at that step (vitkit/train/progressive.py)
BatchResize = Callable[[torch.Tensor, int], torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss was NaN or infinite for too many steps in a row."""


def _diverged(streak: int, step: int, lr: float) -> TrainingDiverged:
    return TrainingDiverged(
        f"the loss was NaN/Inf for {streak} steps in a row at step {step} (lr {lr:.3g}); "
        "lower --lr, raise --warmup-epochs, set --clip-grad, or use --precision fp32"
    )


class DeviceGuard:
    """The non-finite guard without a host sync per step, for a GPU: fused AdamW skips a bad step on the device
    (its `found_inf` input, the one AMP's GradScaler uses), and the counters below stay on the device until
    `read()` (every `log_every` steps). One host sync per step stalls the host until the GPU's queue drains, so
    it cannot launch step n+1 while the GPU runs step n.

    Differences from the synchronous guard, all from the host not knowing at once: a skipped step still advances
    the step counter and the lr schedule (as under GradScaler), the EMA still moves toward the (unchanged)
    weights, and a run that diverges stops at the next read, up to `log_every` steps late (the bad steps
    themselves changed no weight).
    """

    def __init__(self, device: torch.device, streak: int = 0):
        # (streak, longest streak since the last read, skipped since the last read, loss sum of good steps, good);
        # `streak` carries a run of bad steps over from the previous epoch or the checkpoint resumed from
        self.counters = torch.tensor([streak, streak, 0, 0, 0], dtype=torch.float32, device=device)

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        bad = ~torch.isfinite(loss) if grad_norm is None else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        bad_f = bad.float()
        c = self.counters
        c[0] = (c[0] + 1) * bad_f  # streak: +1 on a bad step, 0 on a good one
        c[1] = torch.maximum(c[1], c[0])
        c[2] += bad_f
        c[3] += torch.where(bad, 0.0, loss.float())
        c[4] += 1 - bad_f
        optimizer.found_inf = bad_f  # fused AdamW: no update, no moment change, step count restored where 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def read(self, state: StepState, max_bad_steps: int, lr: float) -> tuple[float, int]:
        """One host sync: warn about the steps skipped since the last read, stop a diverged run (TrainingDiverged).
        Returns (loss sum, good steps) since the last read."""
        streak, longest, skipped, loss_sum, good = self.counters.tolist()
        self.counters[1:] = 0
        self.counters[1] = streak
        state.bad_streak = int(streak)
        if skipped:
            warnings.warn(
                f"step {state.step}: non-finite loss or gradient in {int(skipped)} of the last steps; skipped on "
                f"the device (longest run {int(longest)}/{max_bad_steps} in a row)",
                stacklevel=3,
            )
        if longest >= max_bad_steps:
            raise _diverged(int(longest), state.step, lr)
        return loss_sum, int(good)


def defers_checks(optimizer: torch.optim.Optimizer, device: torch.device, distributed: bool) -> bool:
    """True where DeviceGuard applies: one process on a GPU with a fused optimizer (the one that takes found_inf)."""
    fused = any(g.get("fused") for g in optimizer.param_groups)
    return device.type == "cuda" and not distributed and fused


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
    # whether after_step(step) writes a checkpoint: the deferred guard's counters are read into the state first
    saves_after: Callable[[int], bool] = lambda step: False
    on_timing: Callable[[int], None] = lambda step: None  # after each optimizer step, for wall-clock budgets
    extra: dict = field(default_factory=dict)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (AMX on CPU, tensor cores on GPU) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy in fp32: soft targets (B, K) from MixUp/CutMix as they are, hard labels (B,) smoothed here
    (classification's loss, `vitkit.tasks.classify.cross_entropy`)."""
    return cross_entropy(logits, targets, label_smoothing)


def _next_step_batches(batches: Iterator, grad_accum: int) -> list | None:
    """The next optimizer step's `grad_accum` micro-batches, or None at the end of the epoch (a short tail is
    dropped). Pulls nothing more than it returns, so a stop between steps leaves the loader exactly there."""
    group = list(itertools.islice(batches, grad_accum))
    return group if len(group) == grad_accum else None


class _LogWindow:
    """The steps since the last `train` record: their images, the loss sum and count of the good ones, the start."""

    def __init__(self) -> None:
        self.start, self.images, self.loss, self.n = time.perf_counter(), 0, 0.0, 0

    def add_loss(self, loss_sum: float, n: int) -> None:
        self.loss, self.n = self.loss + loss_sum, self.n + n

    def log(self, logger: RunLogger | None, step: int, epoch: int, lr: float, grad_norm: torch.Tensor | None) -> None:
        """Write the window's `train` record and the bar's numbers (nothing when no step of it was good)."""
        if logger is None or not self.n:
            return
        ips = self.images / max(time.perf_counter() - self.start, 1e-9)
        grad = None if grad_norm is None else float(grad_norm)
        logger.log("train", step, epoch=epoch, loss=self.loss / self.n, lr=lr, img_per_s=ips, grad_norm=grad)
        if logger.bar is not None:
            logger.bar.set_postfix(loss=f"{self.loss / self.n:.3f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")


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
    lookahead: Lookahead | None = None,
    max_bad_steps: int = 5,
    logger: RunLogger | None = None,
    log_every: int = 10,
    epoch: int = 0,
    hooks: EpochHooks | None = None,
    env: DistEnv | None = None,
    defer_checks: bool | None = None,
    loss_fn: LossFn | None = None,
    resize: BatchResize | None = None,
) -> dict[str, float]:
    """One pass over `loader` (or until `hooks.should_stop`), one optimizer step per `grad_accum` batches.

    A step whose loss or gradient norm is NaN/Inf is skipped with a warning; after `max_bad_steps` in a row the
    run stops with TrainingDiverged. Under torchrun pass `env`: a NaN loss on any rank then skips the step on
    every rank (the ranks must run the same backward passes, or their gradient all-reduces mismatch and hang).
    `defer_checks` (default: `defers_checks(...)`, i.e. one process on a GPU with fused AdamW) runs the guard on
    the device instead (DeviceGuard: no host sync per step; its docstring lists what differs).
    `loss_fn(model(x), y)` gives the loss (default: cross-entropy with `label_smoothing`, `compute_loss`).
    `lookahead` moves the weights after the optimizer step, before the EMA (`ema`) averages them.
    `resize(x, step)` gives the images the model sees at that optimizer step (progressive resizing; None: as made).
    Returns {"loss": mean loss, "images": images, "seconds": wall time}.
    """
    hooks = hooks or EpochHooks()
    if loss_fn is None:
        loss_fn = partial(compute_loss, label_smoothing=label_smoothing)
    distributed = env is not None and env.distributed
    if defer_checks is None:
        defer_checks = defers_checks(optimizer, device, distributed)
    guard = DeviceGuard(device, state.bad_streak) if defer_checks else None
    model.train()
    loss_sum, loss_n, images = 0.0, 0, 0
    t_epoch = time.perf_counter()
    window = _LogWindow()
    batches = iter(loader)
    while not hooks.should_stop(state.step):
        micro = _next_step_batches(batches, grad_accum)
        if micro is None:
            break
        lr = schedule.lr_at(state.step)
        apply_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        step_loss, finite, n_img = 0.0, True, 0
        step_loss_t = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
        for x, y in micro:
            x, y = to_device(x, device), to_device(y, device)
            if resize is not None:
                x = resize(x, state.step)
            with autocast(precision, device):
                out = model(x)  # logits (B, K), or what the objective's module returns
            loss = loss_fn(out, y) / grad_accum
            # several ranks: one rank's NaN must skip backward on every rank, decided before it (a collective);
            # one process: backward runs anyway and the single check below catches the NaN it leaves
            if distributed and not all_ranks_true(torch.isfinite(loss.detach()), env):
                finite = False
                break
            loss.backward()
            step_loss_t += loss.detach().float()
            n_img += x.shape[0]
        grad_norm = None
        if finite and clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, replicated
                grad_norm = grad_norm.full_tensor()
        if guard is not None:  # no host sync: the device skips a bad step, the host learns at the next read
            guard.step(optimizer, step_loss_t, grad_norm)
        else:
            if finite:
                # one host sync per step for the loss and the clipped norm together: each sync stalls a GPU queue
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
                    raise _diverged(state.bad_streak, state.step, lr)
                continue
            state.bad_streak = 0
            optimizer.step()
            loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
            window.add_loss(step_loss, 1)
        core = getattr(model, "module", model)  # DDP keeps the model in .module
        if lookahead is not None:
            lookahead.after_step(core, state.step + 1, schedule.total_steps)
        if ema is not None:
            ema.update(core, state.step)
        state.step += 1
        state.images_seen += n_img
        images += n_img
        window.images += n_img
        hooks.on_timing(state.step)
        if logger is not None:
            logger.step(1, **({} if guard is not None else {"loss": step_loss, "lr": lr}))
        if guard is not None and (state.step % log_every == 0 or hooks.saves_after(state.step)):
            # a read: the log window's loss, and a checkpoint about to be written carries the current streak
            read_loss, read_n = guard.read(state, max_bad_steps, lr)
            loss_sum, loss_n = loss_sum + read_loss, loss_n + read_n
            window.add_loss(read_loss, read_n)
        if state.step % log_every == 0:
            window.log(logger, state.step, epoch, lr, grad_norm)
            window = _LogWindow()
        hooks.after_step(state.step)
    if guard is not None:  # the steps since the last read
        tail_loss, tail_n = guard.read(state, max_bad_steps, schedule.lr_at(max(state.step - 1, 0)))
        loss_sum, loss_n = loss_sum + tail_loss, loss_n + tail_n
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
    task: Task | None = None,
) -> dict:
    """`task`'s metrics of `model` on (x, targets) batches; a classifier's (task None):
    {"top1", "top5", "loss", "n", "per_class", "confusion" (K, K)}.

    The model runs in `vitkit.infer.evaluate.evaluate_batches`, shared with `vitkit evaluate`.
    """
    return evaluate_batches(model, loader, num_classes, device=device, precision=precision, topk=topk, task=task)
