"""`fit(cfg)`: a whole training run — data, model, optimizer, schedule, EMA, checkpoints, logs — around the two
plain functions of loop.py. This is what `vitkit train` calls.

Order of a run (`TrainingRun`): set up (build.py: load data through the decode cache, build or restore the model,
wrap it with `prepare_model`, where DDP / FSDP2 plug in, make the loaders) -> restore the checkpoint's state ->
epochs of train_one_epoch + evaluate + last.ckpt, paced by the `BudgetClock` under --minutes -> evaluate raw and
EMA weights, keep the better -> `model.safetensors` (config, preprocessing, class names inside: it predicts
correctly on its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data.transforms import loss_label_smoothing
from ..model.serialization import CheckpointError
from ..model.vit import VisionTransformer
from ..threads import configure as configure_threads
from .build import (
    RunData,
    build_model,
    build_or_restore_model,
    check_combinations,
    default_model,
    describe,
    load_run_data,
    make_loaders,
    make_task,
    model_from_meta,
    resumed_data_mode,
    wrap_model,
)
from .checkpoint import LAST, host_rng_state, load_checkpoint, model_meta, restore_host_rng_state, save_checkpoint
from .distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    from_main,
    full_model_state_dict,
    full_optimizer_state_dict,
    gather_rank_states,
    init_distributed,
    is_fsdp,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
    restore_rank_state,
    unwrap,
)
from .ema import Lookahead
from .logging import RunLogger
from .loop import EpochHooks, LossFn, StepState, evaluate, train_one_epoch
from .progressive import ProgressiveResize, check_size_steps
from .recipe import TrainConfig, merge_resumed
from .schedule import WarmupCosine

if TYPE_CHECKING:
    from ..tasks import Task

MODEL_FILE = "model.safetensors"


class CheckpointWriteError(OSError):
    """The run could not write its checkpoint and stopped; the previous checkpoint is intact."""


@dataclass
class FitResult:
    """What a run produced and how it went."""

    out_dir: Path
    model_path: Path | None  # the saved vitkit .safetensors (None when the run stopped early)
    checkpoint_path: Path
    val_top1: float | None
    val_top5: float | None
    best_weights: str  # "ema" or "raw"
    steps: int
    epochs: float
    train_seconds: float
    images_per_second: float
    data_seconds: float
    finished: bool
    val_raw: dict | None = None
    val_ema: dict | None = None
    val_summary: dict[str, float] | None = None  # the task's numbers of the kept weights (e.g. {"map", "f1"})


# ------------------------------------------------------------------------------------------------ helpers
def resolve_resume(cfg: TrainConfig, resume: bool | None) -> tuple[TrainConfig, dict | None]:
    """If `out/last.ckpt` exists (or resume=True demands it), load it and return the run's stored config."""
    ckpt_path = Path(cfg.out) / LAST
    if resume is False or (resume is None and not ckpt_path.exists()):
        return cfg, None
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint '{ckpt_path}' to resume from; drop --resume to start afresh")
    state = load_checkpoint(ckpt_path)
    return merge_resumed(cfg, type(cfg).from_dict(state["config"]), ckpt_path), state


def _reduce_eval(res: dict, env: DistEnv) -> dict:
    """Sum per-rank evaluation counts into the global result (no-op in one process)."""
    if not env.distributed:
        return res
    k = res["confusion"].shape[0]
    packed = torch.cat(
        [
            torch.tensor([res["top5"] * res["n"], res["loss"] * res["n"], res["n"]], dtype=torch.float64),
            res["confusion"].flatten().double(),
        ]
    )
    total = all_reduce_sum(packed, env)
    n = total[2].item()
    conf = total[3:].round().long().view(k, k)
    per_n = conf.sum(1)
    return {
        "top1": conf.diag().sum().item() / max(n, 1),
        "top5": total[0].item() / max(n, 1),
        "loss": total[1].item() / max(n, 1),
        "n": int(n),
        "confusion": conf,
        "per_class": [conf[c, c].item() / per_n[c].item() if per_n[c] else None for c in range(k)],
    }


def _accuracy(res: dict, task: Task) -> dict[str, float]:
    """The task's headline numbers of an evaluation result (classification: top-1 / top-5; multi-label: mAP, F1);
    none for an objective that measures none of them."""
    return task.summary(res) if task.headline in res else {}


def val_record(res: dict, task: Task) -> dict[str, float]:
    """An evaluation result as `val_*` fields of a metrics record: the task's numbers where measured, the loss."""
    return {f"val_{k}": v for k, v in {**_accuracy(res, task), **{k: res[k] for k in ("loss",) if k in res}}.items()}


def _val_summary(record: dict, headline: str = "top1") -> str:
    if f"val_{headline}" in record:
        return f", val {'top-1' if headline == 'top1' else headline} {record[f'val_{headline}']:.2%}"
    return f", val loss {record['val_loss']:.4f}" if "val_loss" in record else ""


def pick_weights(res_raw: dict | None, res_ema: dict | None, has_ema: bool, key: str = "top1") -> str:
    """ "ema" or "raw": the better on validation by `key` (higher is better: the task's headline); without
    validation data (or that number) the EMA, the usual safer pick."""
    if res_raw is None or key not in res_raw:
        return "ema" if has_ema else "raw"
    return "ema" if res_ema is not None and res_ema[key] >= res_raw[key] else "raw"


class BudgetClock:
    """Fits the cosine schedule into a wall-clock budget: measures step time, re-lays the schedule, says stop."""

    def __init__(
        self,
        minutes: float | None,
        elapsed: float = 0.0,
        calib_steps: int = 20,
        skip_steps: int = 3,
        calibrated: bool = False,
    ):
        self.budget = None if minutes is None else minutes * 60.0
        self.start = time.perf_counter() - elapsed  # elapsed: seconds used before a resume
        self.calib_steps, self.skip_steps = calib_steps, skip_steps
        self.reserve = 0.0 if self.budget is None else 0.03 * self.budget  # final eval + save, until measured
        self.calibrated = calibrated
        self.recent: deque[tuple[int, float]] = deque(maxlen=101)  # (step, time) of the last steps: the pace

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed >= self.budget - self.reserve

    def estimate_total(self, step: int, sec_per_step: float) -> int:
        return step + max(int((self.budget - self.reserve - self.elapsed) / max(sec_per_step, 1e-6)), 1)

    def pace(self, step: int) -> float | None:
        """Note that `step` is done; the seconds per step to lay the schedule over when it is time to (re)lay it.

        Before calibration: once the first `skip_steps + calib_steps` steps are timed, their wall pace, not the
        per-step times: on a GPU the host queues steps ahead and only the periodic reads wait for them, so single
        steps look faster than they are. After: every 10 steps, the pace of the last 100 (the machine's pace
        changes with other jobs: the schedule follows it smoothly).
        """
        self.recent.append((step, time.perf_counter()))
        if not self.calibrated:
            if len(self.recent) < self.skip_steps + self.calib_steps:  # recent holds every step so far
                return None
            (s0, t0), (s1, t1) = self.recent[-1 - self.calib_steps], self.recent[-1]
            return (t1 - t0) / (s1 - s0)
        if step % 10 or len(self.recent) < 11:
            return None
        (s0, t0), (s1, t1) = self.recent[0], self.recent[-1]
        return (t1 - t0) / (s1 - s0)


# ---------------------------------------------------------------------------------------------------- run
class TrainingRun:
    """One training run: set up from a TrainConfig (and a checkpoint's state), then `train()`, then `finish()`
    (or `pause()` when --stop-after-steps ended it before the schedule).

    Classification as it stands; another objective (vitkit/pretrain) subclasses it and overrides `trainee` (the
    module the optimizer steps around `core`) and `load_data` (its reading of the images), sets `loss_fn`, and
    overrides `evaluate` (its own metrics).
    """

    loss_fn: LossFn | None = None  # (trainee's output, targets) -> loss; None: cross-entropy (loop.compute_loss)

    def __init__(self, cfg: TrainConfig, state: dict | None):
        check_combinations(cfg)
        if cfg.threads is not None:  # None: the process's setting (the `vitkit` command's --threads auto)
            configure_threads(cfg.threads)
        self.cfg, self.env, self.out = cfg, init_distributed(), Path(cfg.out)
        self.ckpt_path = self.out / LAST
        self.logger: RunLogger | None = None
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.resumed_data_mode = resumed_data_mode(state)  # a resumed run reads its data as it started: stream or cache
        self.data = self.load_data()
        self.task = make_task(cfg, self.data)  # what the model learns: its head, loss and metrics (vitkit/tasks)
        if self.loss_fn is None:  # the task's loss, unless the objective brings its own
            self.loss_fn = self.task.loss
        self.core = build_or_restore_model(cfg, self.data, state, self.task)
        if self.env.is_main:
            describe(self.data, self.core)
        self.model, self.optimizer, self.ema = wrap_model(cfg, self.trainee(), self.env)
        self.lookahead = (
            Lookahead(unwrap(self.model), cfg.lookahead_every, cfg.lookahead_decay) if cfg.lookahead_every else None
        )
        self.loader, self.val_loader = make_loaders(cfg, self.data, self.core, self.env, self.task)
        self.steps_per_epoch = len(self.loader) // cfg.grad_accum
        # the run's length in epochs; None under --minutes, where the schedule is re-laid once the pace is measured
        self.epochs = cfg.epochs if cfg.epochs is not None else (None if cfg.minutes else 10.0)
        total = math.ceil(self.epochs * self.steps_per_epoch) if self.epochs is not None else 10**9
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.schedule = WarmupCosine(cfg.lr, total, warmup, cfg.min_lr, warmup_fraction=cfg.warmup_fraction)
        self.resize = self._progressive_resize()
        self.step_state = StepState()
        self.val_history: dict[str, Any] = {}
        if state:
            self._restore(state)
        self.clock = BudgetClock(
            cfg.minutes,
            float(state.get("budget_elapsed", 0.0)) if state else 0.0,
            calibrated=bool(state and cfg.minutes and state.get("budget_calibrated")),
        )
        self.logger = self._start_logger(fresh=state is None)
        self.last_save = time.perf_counter()  # when last.ckpt was last written (or the run started)

    # ---- set-up
    def _progressive_resize(self) -> ProgressiveResize | None:
        """`cfg.progressive_sizes`: the batch resizer that follows the schedule, checked against the model."""
        sizes = self.cfg.progressive_sizes
        if not sizes:
            return None
        if type(self).loss_fn is not None:  # an objective of its own (MAE pretraining) encodes a fixed patch grid
            raise ValueError(f"progressive_sizes trains classifiers; {type(self).__name__} does not take it")
        check_size_steps(sizes, self.core.cfg)
        return ProgressiveResize(sizes, self.schedule)

    def load_data(self) -> RunData:
        """The run's images and its validation split, labelled."""
        return load_run_data(self.cfg, self.env, self.resumed_data_mode)

    def trainee(self) -> nn.Module:
        """The module the optimizer steps and checkpoints hold: the ViT itself here, whose output is the logits."""
        return self.core

    def _restore(self, state: dict) -> None:
        """Continue where the checkpoint stopped: weights, optimizer, schedule, EMA, counters, RNGs, data order."""
        load_full_model_state_dict(self.model, state["model"], self.env)
        load_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], self.env)
        self.schedule.load_state_dict(state["schedule"])
        if self.epochs is not None and state["config"].get("epochs") != self.cfg.epochs:  # the run was lengthened
            self.schedule.relayout(math.ceil(self.epochs * self.steps_per_epoch))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None and state.get("lookahead") is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        self.step_state = StepState(**state["step_state"])
        self.val_history = dict(state.get("val") or {})
        restore_rank_state(state["rng"], self.env, self.loader)
        restore_host_rng_state(state["host_rng"])
        self.say(
            f"resumed from {self.ckpt_path} at step {self.step_state.step} (epoch {self.loader.epoch}, "
            f"batch {self.loader.state_dict()['batch_index']})"
        )

    def _start_logger(self, fresh: bool) -> RunLogger:
        total = self.schedule.total_steps if self.epochs is not None else 0
        logger = RunLogger(self.out, total, self.step_state.step, self.env.is_main, show_bar=self.cfg.progress)
        if fresh:
            logger.log(
                "info",
                0,
                config=json.loads(json.dumps(self.cfg.to_dict(), default=str)),
                params=sum(p.numel() for p in self.core.parameters()),
                steps_per_epoch=self.steps_per_epoch,
                data_seconds=round(self.data.seconds, 2),
            )
        return logger

    # ---- pieces the loop calls
    def say(self, msg: str) -> None:
        if self.env.is_main:
            (self.logger.print if self.logger is not None else print)(msg)

    def _training_state(self, best: str | None, finished: bool) -> dict[str, Any]:
        """Everything a resume needs. Collective under FSDP: every rank calls it; rank 0 gets the full state."""
        model_state = full_model_state_dict(self.model, self.env)
        opt_state = full_optimizer_state_dict(self.model, self.optimizer, self.env)
        rng = gather_rank_states(self.env, self.loader)
        return {
            "model": model_state,
            "optimizer": opt_state,
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "rng": rng,
            "host_rng": host_rng_state(),
            "step": self.step_state.step,
            "epoch": self.loader.epoch,
            "step_state": dataclasses.asdict(self.step_state),
            "config": self.cfg.to_dict(),
            "model_meta": model_meta(self.core),
            "budget_elapsed": self.clock.elapsed,
            "budget_calibrated": self.clock.calibrated,
            "best_weights": best,
            "finished": finished,
            "val": self.val_history,
        }

    def checkpoint(self, best: str | None = None, finished: bool = False) -> None:
        """Write last.ckpt: every rank calls (collective under FSDP); rank 0 writes atomically. A failed write
        stops the run (CheckpointWriteError)."""
        self.last_save = time.perf_counter()
        payload = self._training_state(best, finished)
        if self.env.is_main:
            try:
                save_checkpoint(self.ckpt_path, payload)
            except OSError as e:
                path = self.ckpt_path
                kept = f"the last good checkpoint '{path}' is intact" if path.exists() else "none was kept"
                raise CheckpointWriteError(
                    f"could not write checkpoint '{path}' at step {self.step_state.step} ({e.strerror or e}); "
                    f"the run stopped; {kept}. Free space (or fix permissions) and rerun the same command to resume"
                ) from e
        barrier(self.env)

    def evaluate(self, which: VisionTransformer) -> dict | None:
        """Validation results of `which` over all ranks (None without validation data)."""
        if self.val_loader is None:
            return None
        self.val_loader.set_epoch(0)
        self.val_loader.batch_index = 0
        # a compiled model evaluates eagerly: eval mode, no grad and the short last batch would each build graphs
        # (tens of seconds on a GPU) for a few seconds of evaluation
        stance = torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()
        with stance:
            res = evaluate(
                which,
                self.val_loader,
                self.data.num_classes,
                device=self.env.device,
                precision=self.cfg.precision,
                task=self.task,
            )
        # FSDP, and tasks whose numbers need every image at once, evaluate everything on every rank
        return res if self.cfg.fsdp or not self.task.shards_eval else _reduce_eval(res, self.env)

    def should_stop(self, step: int) -> bool:
        if self.cfg.stop_after_steps is not None and step >= self.cfg.stop_after_steps:
            return True
        return step >= self.schedule.total_steps or self._out_of_time()  # the schedule is the same on every rank

    def _out_of_time(self) -> bool:
        """Rank 0's clock decides for every rank (one broadcast per step under torchrun; none without a budget)."""
        return self.clock.budget is not None and bool(from_main(float(self.clock.out_of_time()), self.env))

    def _pace_schedule(self, step: int) -> None:
        """--minutes: after the first steps lay the schedule over the steps that fit; then follow the pace.

        Every rank reaches the same lay-outs at the same steps (counts, not times, pick them) and takes rank 0's
        step total (`from_main`), so all ranks follow one schedule whatever their own clocks measured.
        """
        if self.cfg.minutes is None:
            return
        sec = self.clock.pace(step)
        if sec is None:
            return
        first = not self.clock.calibrated
        slack = 1.05 if first else 1.0  # the first lay-out leaves room for the evaluations and saves to come
        total = int(from_main(self.clock.estimate_total(step, sec * slack), self.env))
        if first or abs(total - self.schedule.total_steps) > 0.01 * self.schedule.total_steps:
            self.schedule.relayout(total, at_step=step)
            self.logger.set_total(self.schedule.total_steps)
        if first:
            self.clock.calibrated = True
            self.say(
                f"budget: {sec * 1000:.0f} ms/step measured -> schedule laid over {self.schedule.total_steps} "
                f"steps (~{self.schedule.total_steps / self.steps_per_epoch:.1f} epochs) in {self.cfg.minutes:g} min"
            )

    def _saves_after(self, step: int) -> bool:
        return bool(self.cfg.checkpoint_every) and step % self.cfg.checkpoint_every == 0

    def _after_step(self, step: int) -> None:
        if self._saves_after(step):
            self.checkpoint()

    def _images_per_second(self) -> float:
        return self.step_state.images_seen * self.env.world_size / max(self.step_state.train_seconds, 1e-9)

    # ---- the epochs
    def train(self) -> None:
        """Epochs until the schedule ends, the budget runs out or --stop-after-steps is reached."""
        hooks = EpochHooks(
            should_stop=self.should_stop,
            after_step=self._after_step,
            on_timing=self._pace_schedule,
            saves_after=self._saves_after,
        )
        cfg = self.cfg
        while not self.should_stop(self.step_state.step):
            epoch = self.loader.epoch
            stats = train_one_epoch(
                self.model,
                self.loader,
                self.optimizer,
                self.schedule,
                self.step_state,
                device=self.env.device,
                precision=cfg.precision,
                label_smoothing=loss_label_smoothing(cfg.augment),
                grad_accum=cfg.grad_accum,
                clip_grad=cfg.clip_grad,
                ema=self.ema,
                lookahead=self.lookahead,
                max_bad_steps=cfg.max_bad_steps,
                logger=self.logger,
                log_every=max(min(cfg.log_every, self.steps_per_epoch), 1),
                epoch=epoch,
                hooks=hooks,
                env=self.env,
                loss_fn=self.loss_fn,
                resize=self.resize,
            )
            if self.loader.epoch == epoch:  # stopped mid-epoch (budget, stop_after_steps)
                break
            self._end_epoch(stats)
        if self.lookahead is not None and not self.stopped_early():  # a pause resumes with the fast weights
            self.lookahead.finish(unwrap(self.model))

    def _end_epoch(self, stats: dict[str, float]) -> None:
        """Evaluate (every eval_every epochs), log, and write last.ckpt unless the last write is recent."""
        ips = stats["images"] * self.env.world_size / max(stats["seconds"], 1e-9)
        record: dict[str, Any] = {"epoch": self.loader.epoch, "train_loss": stats["loss"], "img_per_s": ips}
        if self.val_loader is not None and self.loader.epoch % max(self.cfg.eval_every, 1) == 0:
            t_eval = time.perf_counter()
            res = self.evaluate(self.model)
            if self.cfg.minutes:  # reserve room for the final evaluation(s) and the save
                self.clock.reserve = (time.perf_counter() - t_eval) * (2 if self.ema is not None else 1) + 5.0
            record.update(val_record(res, self.task))
            self.val_history = {**_accuracy(res, self.task), "step": self.step_state.step}
        self.logger.log("val", self.step_state.step, **record)
        summary = _val_summary(record, self.task.headline)
        self.say(f"epoch {self.loader.epoch}: loss {stats['loss']:.4f}, {ips:.0f} img/s" + summary)
        # every epoch, or (checkpoint_seconds) once the last write is that old: rank 0's clock decides for all ranks
        stale = time.perf_counter() - self.last_save >= self.cfg.checkpoint_seconds
        if bool(from_main(float(stale), self.env)):
            self.checkpoint()

    # ---- the end
    def stopped_early(self) -> bool:
        """--stop-after-steps ended the run before its schedule did."""
        step = self.step_state.step
        return self.cfg.stop_after_steps is not None and self.cfg.stop_after_steps <= step < self.schedule.total_steps

    def pause(self) -> FitResult:
        """Checkpoint and stop; the same command resumes."""
        self.checkpoint()
        self.logger.close()
        self.say(
            f"stopped after step {self.step_state.step} as asked; resume with the same command "
            f"(checkpoint {self.ckpt_path})"
        )
        return FitResult(
            out_dir=self.out,
            model_path=None,
            checkpoint_path=self.ckpt_path,
            val_top1=None,
            val_top5=None,
            best_weights="raw",
            steps=self.step_state.step,
            epochs=self.loader.epoch,
            train_seconds=self.step_state.train_seconds,
            images_per_second=self._images_per_second(),
            data_seconds=self.data.seconds,
            finished=False,
        )

    def _final_model(self, best: str) -> VisionTransformer:
        """The model to save: the raw weights (gathered from the shards under FSDP, a collective) or the EMA's."""
        final_model = self.core
        if is_fsdp(self.model):  # sharded weights: gather the full state (collective), rank 0 saves it
            full = full_model_state_dict(self.model, self.env)
            if self.env.is_main:
                final_model = model_from_meta(model_meta(self.core))
                final_model.load_state_dict(full)
        if best == "ema":
            final_model = model_from_meta(model_meta(self.core))
            final_model.load_state_dict(self.ema.state_dict())
        return final_model

    def _final_record(self, best: str, res_raw: dict | None, res_ema: dict | None, chosen: dict | None) -> dict:
        record = {
            "epoch": self.step_state.images_seen * self.env.world_size / max(len(self.data.train_idx), 1),
            "best_weights": best,
        }
        for tag, res in (("raw", res_raw), ("ema", res_ema)):
            if res is not None:
                record.update({f"{tag}_{k}": v for k, v in _accuracy(res, self.task).items()})
        if chosen is not None:
            record.update(val_record(chosen, self.task))
        return record

    def finish(self) -> FitResult:
        """Evaluate the raw and the EMA weights, keep the better, write the last checkpoint and model.safetensors."""
        res_raw = self.evaluate(self.model)
        res_ema = self.evaluate(self.ema.module) if self.ema is not None else None
        best = pick_weights(res_raw, res_ema, self.ema is not None, self.task.headline)
        chosen = res_ema if best == "ema" else res_raw
        final_model = self._final_model(best)
        record = self._final_record(best, res_raw, res_ema, chosen)
        if chosen is not None:
            self.val_history = {**_accuracy(chosen, self.task), "step": self.step_state.step, "weights": best}
        wall = round(self.clock.elapsed, 2)
        train_s = round(self.step_state.train_seconds, 2)
        self.logger.log("final", self.step_state.step, train_seconds=train_s, wall_seconds=wall, **record)
        self.checkpoint(best=best, finished=True)
        model_path = None
        if self.env.is_main:
            acc = {} if chosen is None else {f"val_{k}": f"{v:.4f}" for k, v in _accuracy(chosen, self.task).items()}
            model_path = final_model.save(self.out / MODEL_FILE, weights=best, steps=str(self.step_state.step), **acc)
        self.logger.close()
        if self.env.is_main:
            self._report(best, res_raw, res_ema, record["epoch"])
        return FitResult(
            out_dir=self.out,
            model_path=model_path,
            checkpoint_path=self.ckpt_path,
            val_top1=None if chosen is None else chosen.get("top1"),
            val_top5=None if chosen is None else chosen.get("top5"),
            best_weights=best,
            steps=self.step_state.step,
            epochs=record["epoch"],
            train_seconds=self.step_state.train_seconds,
            images_per_second=self._images_per_second(),
            data_seconds=self.data.seconds,
            finished=True,
            val_raw=res_raw,
            val_ema=res_ema,
            val_summary=None if chosen is None else _accuracy(chosen, self.task),
        )

    def _report(self, best: str, res_raw: dict | None, res_ema: dict | None, epochs: float) -> None:
        key = self.task.headline
        if res_raw is not None and key in res_raw:
            name = "top-1" if key == "top1" else key
            ema_txt = f", EMA weights {res_ema[key]:.2%}" if res_ema is not None else ""
            print(f"validation {name}: raw weights {res_raw[key]:.2%}{ema_txt} -> kept the {best} weights")
        print(
            f"trained {self.step_state.step} steps ({epochs:.2f} epochs) in {self.step_state.train_seconds:.0f} s "
            f"({self._images_per_second():.0f} img/s)"
        )


# ---------------------------------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig, resume: bool | None = None) -> FitResult:
    """Train a ViT as `cfg` says; resumes from `cfg.out/last.ckpt` when it exists (or fails if resume=True and not).

    With `cfg.epochs` the run is bit-identical whether or not it was interrupted and resumed (CPU, same threads).
    With `cfg.minutes` the schedule is laid over the steps measured to fit the budget (the clock starts after the
    data is loaded; the decode cache is reported separately) and the run stops at the budget. Training images
    fewer than one batch lower the batch size to fit them (with a warning).
    """
    cfg, state = resolve_resume(cfg, resume)
    run = TrainingRun(cfg, state)
    run.train()
    return run.pause() if run.stopped_early() else run.finish()


__all__ = [
    "fit",
    "FitResult",
    "TrainingRun",
    "TrainConfig",
    "default_model",
    "build_model",
    "CheckpointError",
    "CheckpointWriteError",
]
