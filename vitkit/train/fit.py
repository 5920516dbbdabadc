"""`fit(cfg)`: a whole training run — data, model, optimizer, schedule, EMA, checkpoints, logs — around the two
plain functions of loop.py. This is what `vitkit train` calls.

Order of a run: load data (decode cache) -> build or restore the model -> wrap it (`prepare_model`, where DDP /
FSDP2 plug in) -> epochs of train_one_epoch + evaluate + last.ckpt -> evaluate raw and EMA weights, keep the better
-> `model.safetensors` (config, preprocessing, class names inside: it predicts correctly on its own).
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
from typing import Any

import numpy as np
import torch

from ..config import PreprocessConfig, ViTConfig, default_preprocess
from ..data.loader import BatchLoader
from ..data.sources import ImageArrayDataset, load_source, stratified_split
from ..data.transforms import build_eval_transform, build_train_transform, loss_label_smoothing
from ..model import create_model
from ..model.serialization import CheckpointError
from ..model.vit import VisionTransformer
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
    prepare_model,
    restore_rank_state,
    unwrap,
)
from .ema import ModelEma
from .logging import RunLogger
from .loop import EpochHooks, StepState, evaluate, train_one_epoch
from .optim import build_optimizer
from .recipe import TrainConfig
from .schedule import WarmupCosine

MODEL_FILE = "model.safetensors"
# Options that may change when a run is resumed; any other difference would break the exact continuation.
RESUMABLE_CHANGES = {
    "epochs",
    "minutes",
    "out",
    "stop_after_steps",
    "progress",
    "checkpoint_every",
    "checkpoint_seconds",
    "log_every",
    "eval_every",
    "cache_dir",
    "threads",
    "max_bad_steps",
    "grad_checkpointing",  # recomputes the same activations (RNG replayed): the continuation stays exact
}


class CheckpointWriteError(OSError):
    """The run could not write its checkpoint and stopped; the previous checkpoint is intact."""


@dataclass
class FitResult:
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


# ------------------------------------------------------------------------------------------------- models
def default_model(image_size: tuple[int, int]) -> tuple[str, dict[str, Any]]:
    """A small preset that suits the data: patch 2 for tiny images, patch 4 up to 64 px, a tiny patch-16 ViT above."""
    h, w = image_size
    if max(h, w) <= 16:
        return "vit_digits_patch2_8", {"img_size": (h - h % 2, w - w % 2)}
    if max(h, w) <= 64:
        return "vit_cifar_patch4_32", {"img_size": (h - h % 4, w - w % 4)}
    side = min(224, max(16, min(h, w) - min(h, w) % 16))
    return "vit_tiny_patch16_224", {"img_size": (side, side)}


def channel_stats(images: np.ndarray, limit: int = 20_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of (N, H, W, C) uint8 images (a seeded sample of at most `limit`)."""
    idx = np.random.default_rng(0).permutation(len(images))[:limit]
    x = np.asarray(images[np.sort(idx)], dtype=np.float32) / 255.0  # (n, H, W, C)
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2)).clip(min=1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def build_model(cfg: TrainConfig, ds: ImageArrayDataset, train_idx: np.ndarray) -> VisionTransformer:
    """A fresh model for `ds` (classes, channels, image size from the data) or a fine-tune of a .safetensors."""
    num_classes = len(ds.classes)
    if cfg.model and Path(cfg.model).exists():
        from ..interop import from_pretrained  # fine-tuning: keep its preprocessing, replace its head

        model = from_pretrained(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
        model.labels = list(ds.classes)
        return model
    size = tuple(ds.images.shape[1:3])
    name, kw = (cfg.model, {}) if cfg.model else default_model(size)
    if not cfg.model:
        kw["in_chans"] = ds.images.shape[3]
    model = create_model(name, **{**kw, "num_classes": num_classes, **cfg.model_kwargs})
    mean, std = channel_stats(ds.images if len(train_idx) == len(ds) else ds.images[np.sort(train_idx)])
    pre = default_preprocess(model.cfg)
    model.preprocess = PreprocessConfig(
        input_size=model.cfg.img_size, mean=mean, std=std, interpolation=pre.interpolation, crop_pct=pre.crop_pct
    )
    model.labels = list(ds.classes)
    return model


def model_from_meta(meta: dict) -> VisionTransformer:
    return VisionTransformer(
        ViTConfig.from_dict(meta["config"]), PreprocessConfig.from_dict(meta["preprocess"]), meta["labels"]
    )


# ------------------------------------------------------------------------------------------------ helpers
def resolve_resume(cfg: TrainConfig, resume: bool | None) -> tuple[TrainConfig, dict | None]:
    """If `out/last.ckpt` exists (or resume=True demands it), load it and return the run's stored config."""
    ckpt_path = Path(cfg.out) / LAST
    if resume is False or (resume is None and not ckpt_path.exists()):
        return cfg, None
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint '{ckpt_path}' to resume from; drop --resume to start afresh")
    state = load_checkpoint(ckpt_path)
    stored = TrainConfig.from_dict(state["config"])
    mine, theirs = cfg.to_dict(), stored.to_dict()
    clash = {k: (theirs[k], mine[k]) for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]}
    if clash and cfg.data:  # cfg.data == "" means "whatever the checkpoint says" (resume from the folder alone)
        detail = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, a, b in ((k, *v) for k, v in clash.items()))
        raise ValueError(
            f"'{ckpt_path}' belongs to a run with other settings ({detail}); resume with the same settings, "
            "or pass a new --out to start another run"
        )
    changes = {k: mine[k] for k in RESUMABLE_CHANGES if k in mine and mine[k] != theirs[k]}
    if cfg.epochs is None and cfg.minutes is None:  # nothing said: keep the run's own length
        changes.pop("epochs", None), changes.pop("minutes", None)
    merged = dict(theirs, **changes)
    return TrainConfig.from_dict(merged), state


def _split(cfg: TrainConfig, ds: ImageArrayDataset, log) -> tuple[np.ndarray, ImageArrayDataset | None, np.ndarray]:
    if cfg.val_data:
        val_ds = load_source(
            cfg.val_data,
            cache_dir=cfg.cache_dir,
            image_size=ds.images.shape[1:3],
            progress=cfg.progress,
            classes=ds.classes,
        )
        return np.arange(len(ds)), val_ds, np.arange(len(val_ds))
    if cfg.val_split > 0:
        train_idx, val_idx = stratified_split(ds.labels, cfg.val_split, cfg.seed)
        return train_idx, ds, val_idx
    return np.arange(len(ds)), None, np.zeros(0, dtype=np.int64)


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


class BudgetClock:
    """Fits the cosine schedule into a wall-clock budget: measures step time, re-lays the schedule, says stop."""

    def __init__(self, minutes: float | None, elapsed: float = 0.0, calib_steps: int = 20, skip_steps: int = 3):
        self.budget = None if minutes is None else minutes * 60.0
        self.start = time.perf_counter() - elapsed  # elapsed: seconds used before a resume
        self.calib_steps, self.skip_steps = calib_steps, skip_steps
        self.reserve = 0.0 if self.budget is None else 0.03 * self.budget  # final eval + save, until measured
        self.calibrated = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed >= self.budget - self.reserve

    def estimate_total(self, step: int, sec_per_step: float) -> int:
        return step + max(int((self.budget - self.reserve - self.elapsed) / max(sec_per_step, 1e-6)), 1)


# ---------------------------------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig, resume: bool | None = None) -> FitResult:
    """Train a ViT as `cfg` says; resumes from `cfg.out/last.ckpt` when it exists (or fails if resume=True and not).

    With `cfg.epochs` the run is bit-identical whether or not it was interrupted and resumed (CPU, same threads).
    With `cfg.minutes` the schedule is laid over the steps measured to fit the budget (the clock starts after the
    data is loaded; the decode cache is reported separately) and the run stops at the budget.
    """
    cfg, state = resolve_resume(cfg, resume)
    if not cfg.data:
        raise ValueError("no --data given (and no checkpoint in the run folder to take it from)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = init_distributed()
    out = Path(cfg.out)
    logger_enabled = env.is_main
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if env.is_main:
            (logger.print if logger is not None else print)(msg)

    logger: RunLogger | None = None
    # ---- data
    t_data = time.perf_counter()
    ds = load_source(
        cfg.data, cache_dir=cfg.cache_dir, image_size=cfg.image_size, progress=cfg.progress and env.is_main
    )
    train_idx, val_ds, val_idx = _split(cfg, ds, say)
    data_seconds = time.perf_counter() - t_data
    if ds.skipped and env.is_main:
        shown = "; ".join(f"{f}: {r}" for f, r in ds.skipped[:5])
        print(f"skipped {len(ds.skipped)} unreadable file(s): {shown}{' ...' if len(ds.skipped) > 5 else ''}")

    # ---- model (built with the seeded RNG; a resume then restores the RNG it had when it stopped)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = model_from_meta(state["model_meta"]) if state else build_model(cfg, ds, train_idx)
    if env.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        cache = (
            f"{'read' if ds.from_cache else 'built'} in {data_seconds:.1f} s"
            if ds.cache_path
            else f"{data_seconds:.1f} s"
        )
        print(
            f"data: {ds.source}: {len(train_idx)} train / {len(val_idx)} val images, {len(ds.classes)} classes, "
            f"{ds.images.shape[1]}x{ds.images.shape[2]} (decode cache {cache})"
        )
        print(
            f"model: {model.cfg.patch_size} patches, D={model.cfg.embed_dim}, depth {model.cfg.depth}, "
            f"stem {model.cfg.stem}, {n_params:,} parameters; input {model.preprocess.input_size}"
        )
    core = model
    core.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.fsdp and cfg.ema_decay > 0:
        raise ValueError("--ema-decay is not supported with --fsdp (the EMA copy would not be sharded); drop one")
    model = prepare_model(model, env, fsdp=cfg.fsdp)
    optimizer = build_optimizer(unwrap(model), cfg.lr, cfg.weight_decay, cfg.betas, cfg.layer_decay, cfg.optimizer_impl)
    ema = ModelEma(unwrap(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    if cfg.compile:
        if cfg.fsdp:
            raise ValueError("--compile with --fsdp is not supported yet (untested); drop one")
        # in place (nn.Module.compile): parameter names, checkpoints and the EMA copy (made above) stay as they are;
        # the training graph is built on the first step; evaluation runs eagerly (run_eval)
        core.compile()

    # ---- data order and transforms
    in_chans = core.cfg.in_chans
    # on a GPU the pixel work of augmentation runs there: the host alone fed ~10-17k img/s to an H200 (README)
    aug_device = env.device if env.device.type == "cuda" else None
    train_tf = build_train_transform(cfg.augment, core.preprocess, len(ds.classes), in_chans, aug_device)
    eval_tf = build_eval_transform(core.preprocess, in_chans, aug_device)
    micro = cfg.batch_size // cfg.grad_accum
    if len(train_idx) < micro * env.world_size:
        raise ValueError(
            f"{ds.source}: {len(train_idx)} training images are fewer than one batch "
            f"({micro} x {env.world_size} ranks); lower --batch-size"
        )
    loader = BatchLoader(
        ds,
        train_idx,
        micro,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
        rank=env.rank,
        world_size=env.world_size,
        transform=train_tf,
    )
    val_loader = None
    if val_ds is not None and len(val_idx):
        val_loader = BatchLoader(
            val_ds,
            val_idx,
            max(256, micro),
            shuffle=False,
            drop_last=False,
            rank=0 if cfg.fsdp else env.rank,  # FSDP: every forward is collective, so every rank evaluates all
            world_size=1 if cfg.fsdp else env.world_size,
            transform=eval_tf,
        )
    steps_per_epoch = len(loader) // cfg.grad_accum
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    epochs = cfg.epochs if cfg.epochs is not None else (None if cfg.minutes else 10.0)
    total = math.ceil(epochs * steps_per_epoch) if epochs is not None else 10**9  # budget: re-laid once measured
    schedule = WarmupCosine(cfg.lr, total, warmup, cfg.min_lr)
    step_state = StepState()
    clock_elapsed = 0.0

    # ---- resume
    if state:
        load_full_model_state_dict(model, state["model"], env)
        load_full_optimizer_state_dict(model, optimizer, state["optimizer"], env)
        schedule.load_state_dict(state["schedule"])
        if epochs is not None and state["config"].get("epochs") != cfg.epochs:  # the run was lengthened
            schedule.relayout(math.ceil(epochs * steps_per_epoch))
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step_state = StepState(**state["step_state"])
        clock_elapsed = float(state.get("budget_elapsed", 0.0))
        restore_rank_state(state["rng"], env, loader)
        restore_host_rng_state(state["host_rng"])
        say(
            f"resumed from {out / LAST} at step {step_state.step} (epoch {loader.epoch}, "
            f"batch {loader.state_dict()['batch_index']})"
        )

    clock = BudgetClock(cfg.minutes, clock_elapsed)
    if state and cfg.minutes and state.get("budget_calibrated"):
        clock.calibrated = True
    logger = RunLogger(
        out, schedule.total_steps if epochs is not None else 0, step_state.step, logger_enabled, show_bar=cfg.progress
    )
    if not state:
        logger.log(
            "info",
            0,
            config=json.loads(json.dumps(cfg.to_dict(), default=str)),
            params=sum(p.numel() for p in core.parameters()),
            steps_per_epoch=steps_per_epoch,
            data_seconds=round(data_seconds, 2),
        )

    ckpt_path = out / LAST
    label_smoothing = loss_label_smoothing(cfg.augment)
    val_history: dict[str, Any] = dict(state.get("val") or {}) if state else {}

    last_save = [time.perf_counter()]  # when last.ckpt was last written (or the run started)

    def checkpoint(best: str | None = None, finished: bool = False) -> None:
        """Collective under FSDP (every rank calls); rank 0 writes atomically. A failed write stops the run."""
        last_save[0] = time.perf_counter()
        model_state = full_model_state_dict(model, env)
        opt_state = full_optimizer_state_dict(model, optimizer, env)
        rng = gather_rank_states(env, loader)
        if env.is_main:
            payload = {
                "model": model_state,
                "optimizer": opt_state,
                "schedule": schedule.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": rng,
                "host_rng": host_rng_state(),
                "step": step_state.step,
                "epoch": loader.epoch,
                "step_state": dataclasses.asdict(step_state),
                "config": cfg.to_dict(),
                "model_meta": model_meta(core),
                "budget_elapsed": clock.elapsed,
                "budget_calibrated": clock.calibrated,
                "best_weights": best,
                "finished": finished,
                "val": val_history,
            }
            try:
                save_checkpoint(ckpt_path, payload)
            except OSError as e:
                kept = f"the last good checkpoint '{ckpt_path}' is intact" if ckpt_path.exists() else "none was kept"
                raise CheckpointWriteError(
                    f"could not write checkpoint '{ckpt_path}' at step {step_state.step} ({e.strerror or e}); "
                    f"the run stopped; {kept}. Free space (or fix permissions) and rerun the same command to resume"
                ) from e
        barrier(env)

    def run_eval(which: VisionTransformer) -> dict | None:
        if val_loader is None:
            return None
        val_loader.set_epoch(0)
        val_loader.batch_index = 0
        # a compiled model evaluates eagerly: eval mode, no grad and the short last batch would each build graphs
        # (tens of seconds on a GPU) for a few seconds of evaluation
        stance = torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext()
        with stance:
            res = evaluate(which, val_loader, len(ds.classes), device=env.device, precision=cfg.precision)
        return res if cfg.fsdp else _reduce_eval(res, env)

    def out_of_time() -> bool:
        """Rank 0's clock decides for every rank (one broadcast per step under torchrun; none without a budget)."""
        return clock.budget is not None and bool(from_main(float(clock.out_of_time()), env))

    def should_stop(step: int) -> bool:
        if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
            return True
        return step >= schedule.total_steps or out_of_time()  # the schedule is the same on every rank (below)

    recent: deque[tuple[int, float]] = deque(maxlen=101)  # (step, time) of the last steps: the current pace

    def on_timing(step: int) -> None:
        """--minutes: after the first steps lay the schedule over the steps that fit; then re-check every 10.

        Every rank reaches the same lay-outs at the same steps (counts, not times, pick them) and takes rank 0's
        step total (`from_main`), so all ranks follow one schedule whatever their own clocks measured.
        """
        if cfg.minutes is None:
            return
        recent.append((step, time.perf_counter()))
        if not clock.calibrated:
            if len(recent) >= clock.skip_steps + clock.calib_steps:  # recent holds every step so far (< its maxlen)
                # wall pace over the calibration steps, not the per-step times: on a GPU the host queues steps
                # ahead and only the periodic reads wait for them, so single steps look faster than they are
                (s0, t0), (s1, t1) = recent[-1 - clock.calib_steps], recent[-1]
                sec = (t1 - t0) / (s1 - s0)
                total = int(from_main(clock.estimate_total(step, sec * 1.05), env))  # slack: evals, saves
                schedule.relayout(total, at_step=step)
                clock.calibrated = True
                logger.set_total(schedule.total_steps)
                say(
                    f"budget: {sec * 1000:.0f} ms/step measured -> schedule laid over {schedule.total_steps} steps "
                    f"(~{schedule.total_steps / steps_per_epoch:.1f} epochs) in {cfg.minutes:g} min"
                )
            return
        if step % 10 == 0 and len(recent) >= 11:  # the machine's pace changes (other jobs): follow it smoothly
            (s0, t0), (s1, t1) = recent[0], recent[-1]
            new_total = int(from_main(clock.estimate_total(step, (t1 - t0) / (s1 - s0)), env))
            if abs(new_total - schedule.total_steps) > 0.01 * schedule.total_steps:
                schedule.relayout(new_total, at_step=step)
                logger.set_total(schedule.total_steps)

    def saves_after(step: int) -> bool:
        return bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0

    def after_step(step: int) -> None:
        if saves_after(step):
            checkpoint()

    hooks = EpochHooks(should_stop=should_stop, after_step=after_step, on_timing=on_timing, saves_after=saves_after)

    # ---- epochs
    while not should_stop(step_state.step):
        epoch = loader.epoch
        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            schedule,
            step_state,
            device=env.device,
            precision=cfg.precision,
            label_smoothing=label_smoothing,
            grad_accum=cfg.grad_accum,
            clip_grad=cfg.clip_grad,
            ema=ema,
            max_bad_steps=cfg.max_bad_steps,
            logger=logger,
            log_every=max(min(cfg.log_every, steps_per_epoch), 1),
            epoch=epoch,
            hooks=hooks,
            env=env,
        )
        if loader.epoch == epoch:  # stopped mid-epoch (budget, stop_after_steps)
            break
        ips = stats["images"] * env.world_size / max(stats["seconds"], 1e-9)
        record: dict[str, Any] = {"epoch": loader.epoch, "train_loss": stats["loss"], "img_per_s": ips}
        if val_loader is not None and loader.epoch % max(cfg.eval_every, 1) == 0:
            t_eval = time.perf_counter()
            res = run_eval(model)
            eval_s = time.perf_counter() - t_eval
            if cfg.minutes:  # reserve room for the final evaluation(s) and the save
                clock.reserve = eval_s * (2 if ema is not None else 1) + 5.0
            record.update(val_top1=res["top1"], val_top5=res["top5"], val_loss=res["loss"])
            val_history = {"top1": res["top1"], "top5": res["top5"], "step": step_state.step}
        logger.log("val", step_state.step, **record)
        say(
            f"epoch {loader.epoch}: loss {stats['loss']:.4f}, {ips:.0f} img/s"
            + (f", val top-1 {record['val_top1']:.2%}" if "val_top1" in record else "")
        )
        # every epoch, or (checkpoint_seconds) once the last write is that old: rank 0's clock decides for all ranks
        if bool(from_main(float(time.perf_counter() - last_save[0] >= cfg.checkpoint_seconds), env)):
            checkpoint()

    stopped_early = (
        cfg.stop_after_steps is not None
        and step_state.step >= cfg.stop_after_steps
        and (step_state.step < schedule.total_steps)
    )
    if stopped_early:
        checkpoint()
        logger.close()
        say(f"stopped after step {step_state.step} as asked; resume with the same command (checkpoint {ckpt_path})")
        return FitResult(
            out,
            None,
            ckpt_path,
            None,
            None,
            "raw",
            step_state.step,
            loader.epoch,
            step_state.train_seconds,
            step_state.images_seen * env.world_size / max(step_state.train_seconds, 1e-9),
            data_seconds,
            False,
        )

    # ---- final: evaluate raw and EMA weights, keep the better
    res_raw = run_eval(model)
    res_ema = run_eval(ema.module) if ema is not None else None
    best = "ema" if res_ema is not None and res_ema["top1"] >= res_raw["top1"] else "raw"
    if res_raw is None and ema is not None:
        best = "ema"  # no validation data: the average of the weights is the usual safer pick
    chosen = res_ema if best == "ema" else res_raw
    final_model = core
    if is_fsdp(model):  # sharded weights: gather the full state (collective), rank 0 saves it
        full = full_model_state_dict(model, env)
        if env.is_main:
            final_model = model_from_meta(model_meta(core))
            final_model.load_state_dict(full)
    if best == "ema":
        final_model = model_from_meta(model_meta(core))
        final_model.load_state_dict(ema.state_dict())
    record = {"epoch": step_state.images_seen * env.world_size / max(len(train_idx), 1), "best_weights": best}
    for tag, res in (("raw", res_raw), ("ema", res_ema)):
        if res is not None:
            record.update({f"{tag}_top1": res["top1"], f"{tag}_top5": res["top5"]})
    if chosen is not None:
        record.update(val_top1=chosen["top1"], val_top5=chosen["top5"], val_loss=chosen["loss"])
        val_history = {"top1": chosen["top1"], "top5": chosen["top5"], "step": step_state.step, "weights": best}
    logger.log(
        "final",
        step_state.step,
        train_seconds=round(step_state.train_seconds, 2),
        wall_seconds=round(clock.elapsed, 2),
        **record,
    )
    checkpoint(best=best, finished=True)
    model_path = None
    if env.is_main:
        acc = {} if chosen is None else {"val_top1": f"{chosen['top1']:.4f}", "val_top5": f"{chosen['top5']:.4f}"}
        model_path = final_model.save(out / MODEL_FILE, weights=best, steps=str(step_state.step), **acc)
    logger.close()
    if env.is_main:
        if res_raw is not None:
            ema_txt = f", EMA weights {res_ema['top1']:.2%}" if res_ema is not None else ""
            print(f"validation top-1: raw weights {res_raw['top1']:.2%}{ema_txt} -> kept the {best} weights")
        print(
            f"trained {step_state.step} steps ({record['epoch']:.2f} epochs) in {step_state.train_seconds:.0f} s "
            f"({step_state.images_seen * env.world_size / max(step_state.train_seconds, 1e-9):.0f} img/s)"
        )
    return FitResult(
        out,
        model_path,
        ckpt_path,
        None if chosen is None else chosen["top1"],
        None if chosen is None else chosen["top5"],
        best,
        step_state.step,
        record["epoch"],
        step_state.train_seconds,
        step_state.images_seen * env.world_size / max(step_state.train_seconds, 1e-9),
        data_seconds,
        True,
        res_raw,
        res_ema,
    )


__all__ = ["fit", "FitResult", "TrainConfig", "default_model", "build_model", "CheckpointError", "CheckpointWriteError"]
