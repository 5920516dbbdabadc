"""`pretrain(cfg)`: a masked-autoencoder pretraining run, on the training machinery of `vitkit train`.

`PretrainingRun` is a `TrainingRun` (vitkit/train/fit.py) with four differences, and nothing else of its own: it
reads the images without needing labels, it trains encoder + decoder (`MaskedAutoencoder`, whose forward returns
the loss), it validates by the reconstruction loss of held-out images, and it draws `reconstruction.png`. The
budget clock (--minutes / --epochs), exact resume (last.ckpt: encoder, decoder, optimizer, RNGs, data position),
the progress bar, metrics.jsonl, TensorBoard, bf16 autocast and torchrun are the trainer's own.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import to_device
from ..data.sources import ImageArrayDataset, load_source, stratified_split
from ..infer.frozen import FrozenEvalEvery
from ..train.build import RunData, model_from_meta
from ..train.checkpoint import LAST, load_checkpoint
from ..train.distributed import DistEnv, all_reduce_sum, unwrap
from ..train.fit import FitResult, TrainingRun, resolve_resume
from ..train.logging import read_metrics
from ..train.loop import autocast
from .config import PretrainConfig
from .mae import MaskedAutoencoder
from .visualise import RECONSTRUCTION_FILE, preview_images, save_reconstructions

HISTORY_DIR = "reconstructions"  # one PNG per drawing, named by step: how the reconstructions sharpened


def _own_loss(loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The masked autoencoder's forward returns its loss already; the loader's targets (labels) are not used."""
    return loss


def load_pretraining_data(cfg: PretrainConfig, env: DistEnv) -> RunData:
    """`cfg.data` read without needing labels (a folder without class folders is one class), and the held-out
    images: `cfg.val_data`, else `cfg.val_split` of them (stratified by class where the data has classes)."""
    start = time.perf_counter()
    read = dict(cache_dir=cfg.cache_dir, progress=cfg.progress and env.is_main, unlabelled_ok=True)
    ds = load_source(cfg.data, image_size=cfg.image_size, **read)
    val_ds: ImageArrayDataset | None = None
    val_idx = np.zeros(0, dtype=np.int64)
    train_idx = np.arange(len(ds))
    if cfg.val_data:
        val_ds = load_source(cfg.val_data, image_size=ds.image_size, **read)
        val_idx = np.arange(len(val_ds))
    elif cfg.val_split > 0:
        train_idx, val_idx = stratified_split(ds.labels, cfg.val_split, cfg.seed)
        val_ds = ds
    if ds.skipped and env.is_main:
        print(f"skipped {len(ds.skipped)} unreadable file(s), e.g. {ds.skipped[0][0]}: {ds.skipped[0][1]}")
    return RunData(ds, train_idx, val_ds, val_idx, seconds=time.perf_counter() - start)


class PretrainingRun(TrainingRun):
    """Masked-autoencoder pretraining: see the module docstring for what differs from a training run."""

    loss_fn = staticmethod(_own_loss)

    def load_data(self) -> RunData:
        data = load_pretraining_data(self.cfg, self.env)
        if self.cfg.knn_every and not self.cfg.knn_data and len(data.ds.classes) < 2:  # refused now, not after epoch 1
            raise ValueError(f"--knn-every needs labelled images: '{self.cfg.data}' has no classes; pass --knn-data")
        return data

    def trainee(self) -> MaskedAutoencoder:
        """The encoder (the run's `core`, saved as model.safetensors) with a decoder for the pixels."""
        cfg = self.cfg
        self.core.reset_classifier(0)  # the encoder is saved headless: fine-tuning gives it the head its data needs
        self.core.labels, self.core.task = None, None  # and is no task's model yet
        self.mae = MaskedAutoencoder(
            self.core, cfg.mask_ratio, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.norm_pix_loss
        )
        return self.mae

    def evaluate(self, which: torch.nn.Module) -> dict | None:
        """The mean reconstruction loss of the held-out images, over all ranks (None without them).

        The masks come from a generator seeded afresh each time, so every evaluation hides the same patches and
        the losses compare across epochs; torch's global generator, which the checkpoint restores, is not drawn.
        """
        if self.val_loader is None:
            return None
        self.val_loader.set_epoch(0)
        self.val_loader.batch_index = 0
        mae = unwrap(which)  # not through DDP: ranks may hold unequal shares of the held-out images
        generator = torch.Generator().manual_seed(self.cfg.seed)
        device, was_training = self.env.device, mae.training
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        stance = torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()
        mae.eval()
        with torch.no_grad(), stance:
            for x, _ in self.val_loader:
                x = to_device(x, device)
                with autocast(self.cfg.precision, device):
                    total += mae(x, generator=generator).double() * x.shape[0]
                count += x.shape[0]
        mae.train(was_training)
        loss_sum, n = all_reduce_sum([total.item(), count], self.env).tolist()
        return {"loss": loss_sum / max(n, 1), "n": int(n)}

    def _end_epoch(self, stats: dict[str, float]) -> None:
        super()._end_epoch(stats)
        every = self.cfg.recon_every
        if every and self.loader.epoch % every == 0:
            self.draw_reconstructions()
        self.knn_accuracy()

    def knn_accuracy(self, final: bool = False) -> dict | None:
        """--knn-every: the k-NN accuracy of the encoder's frozen features (rank 0), logged as a `knn` record; at
        the end of the run (`final`) once more unless the last epoch end just measured these weights."""
        if not self.env.is_main or not self.cfg.knn_every:
            return None
        if not hasattr(self, "knn"):
            spec = self.cfg.knn_data or self.cfg.data
            self.knn = FrozenEvalEvery(
                spec, self.cfg.knn_every, cache_dir=self.cfg.cache_dir, precision=self.cfg.precision
            )
            self.knn_step = -1
        step = self.step_state.step
        if final and self.knn_step == step:
            return None
        res = self.knn(self.core, self.loader.epoch, force=final)
        if res is not None:
            self.knn_step = step
            epoch = round(step / max(self.steps_per_epoch, 1), 2)
            self.logger.log("knn", step, epoch=epoch, final=final, **res)
            self.say(f"epoch {epoch:g}: k-NN (k={res['k']}) top-1 {res['knn_top1']:.2%} on {res['queries']} images")
        return res

    def finish(self) -> FitResult:
        self.knn_accuracy(final=True)  # before the trainer's finish closes the log
        result = super().finish()
        self.draw_reconstructions()
        return result

    def draw_reconstructions(self) -> Path | None:
        """Write `reconstruction.png` (and a copy under reconstructions/, named by step) on rank 0.

        Runs the model on a fixed set of images with fixed masks and draws nothing from torch's global generator,
        so drawing changes nothing a resumed run depends on.
        """
        if not self.env.is_main:
            return None
        if not hasattr(self, "preview"):
            self.preview = preview_images(self.data, self.cfg.seed)
        step = self.step_state.step
        title = f"step {step}, epoch {step / max(self.steps_per_epoch, 1):.1f}"
        path = save_reconstructions(self.mae, self.preview, self.out / RECONSTRUCTION_FILE, self.cfg.seed, title)
        history = self.out / HISTORY_DIR / f"step_{step:07d}.png"
        history.parent.mkdir(parents=True, exist_ok=True)
        history.write_bytes(path.read_bytes())
        return path


def pretrain(cfg: PretrainConfig, resume: bool | None = None) -> FitResult:
    """Pretrain `cfg.model` (default: a small preset for the data's size) as a masked autoencoder on `cfg.data`.

    Writes `cfg.out/model.safetensors` (the encoder, headless: `finetune --from`, `embed`, `explain` and
    `from_pretrained` take it), `last.ckpt` (encoder + decoder + optimizer + RNGs: the same call resumes it),
    metrics.jsonl and reconstruction.png. With `cfg.epochs` the run is bit-identical whether or not it was
    interrupted and resumed (CPU, same threads), as training is.
    """
    cfg, state = resolve_resume(cfg, resume)
    run = PretrainingRun(cfg, state)
    run.train()
    return run.pause() if run.stopped_early() else run.finish()


def is_pretraining_run(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a pretraining run with a checkpoint: its metrics.jsonl starts with a config that has
    the masked autoencoder's options (read there, not from last.ckpt, which may be large)."""
    if not (Path(run_dir) / LAST).is_file():
        return False
    info = next((r for r in read_metrics(run_dir) if r.get("kind") == "info"), {})
    return "mask_ratio" in (info.get("config") or {})


def draw_from_checkpoint(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the reconstructions of a pretraining run from its last.ckpt (`vitkit plot RUN`); default
    `RUN/reconstruction.png`. The run's data must be where the run read it."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / LAST)
    cfg = PretrainConfig.from_dict(state["config"])
    mae = MaskedAutoencoder(
        model_from_meta(state["model_meta"]),
        cfg.mask_ratio,
        cfg.decoder_dim,
        cfg.decoder_depth,
        cfg.decoder_heads,
        cfg.norm_pix_loss,
    )
    mae.load_state_dict(state["model"])
    cfg.progress = False
    images = preview_images(load_pretraining_data(cfg, DistEnv()), cfg.seed)
    title = f"step {state['step']} (last.ckpt)"
    return save_reconstructions(mae, images, out or run_dir / RECONSTRUCTION_FILE, cfg.seed, title)
