"""The set-up half of a training run: its data, its task, its model and its batch loaders, each from the TrainConfig.

`fit()` (fit.py) calls these in order, then trains: `load_run_data` (read by the task's reader) -> `make_task` ->
`build_or_restore_model` (with the task's head) -> `wrap_model` (DDP / FSDP2, optimizer, EMA, compile) ->
`make_loaders`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, ViTConfig, default_preprocess
from ..data.loader import BatchLoader, class_balanced_weights
from ..data.sources import ImageArrayDataset, stratified_subset
from ..data.stream_sources import cache_limit, can_stream, estimated_cache_bytes, format_size, open_stream_source
from ..data.streaming import (
    EvalCrop,
    RandomAccessLoader,
    ShardLoader,
    StreamSource,
    TrainCrop,
    batch_augment,
    batch_preprocess,
    stream_workers,
)
from ..data.transforms import AugmentConfig, build_eval_transform, build_train_transform
from ..model import create_model
from ..model.serialization import apply_task
from ..model.vit import VisionTransformer
from ..tasks import Task, task_class
from .distributed import DistEnv, prepare_model, unwrap
from .ema import ModelEma
from .optim import build_optimizer
from .recipe import TrainConfig
from .whiten import WHITEN_IMAGES, first_stem_conv, whiten_conv

# ---------------------------------------------------------------------------------------------------- data
STREAM_IMAGE_SIZE = 224  # a fresh model's input for streamed data (images of every size): the standard recipe's


@dataclass
class RunData:
    """The images of a run: `ds[train_idx]` to train on, `val_ds[val_idx]` to validate on (none: no validation).
    Decoded once into the cache (ImageArrayDataset), or decoded as it trains (StreamSource)."""

    ds: ImageArrayDataset | StreamSource
    train_idx: np.ndarray
    val_ds: ImageArrayDataset | StreamSource | None
    val_idx: np.ndarray
    seconds: float  # loading time, the decode cache's included

    @property
    def num_classes(self) -> int:
        return len(self.ds.classes)


def split_validation(
    cfg: TrainConfig, ds: ImageArrayDataset
) -> tuple[np.ndarray, ImageArrayDataset | None, np.ndarray]:
    """(train indices, validation dataset, validation indices): `cfg.val_data`, else `cfg.val_split` held out as the
    task splits (a classifier: stratified by class)."""
    reader = task_class(cfg.task)()
    if cfg.val_data and isinstance(ds, StreamSource):  # validation streams too, cropped as the model's inference
        val_src = open_stream_source(cfg.val_data, cache_dir=cfg.cache_dir, progress=cfg.progress, classes=ds.classes)
        return np.arange(len(ds)), val_src, np.arange(len(val_src))
    if cfg.val_data:
        val_ds = reader.read(
            cfg.val_data,
            cache_dir=cfg.cache_dir,
            image_size=ds.images.shape[1:3],
            progress=cfg.progress,
            classes=ds.classes,
        )
        return np.arange(len(ds)), val_ds, np.arange(len(val_ds))
    if cfg.val_split > 0:
        train_idx, val_idx = reader.split(ds.labels, cfg.val_split, cfg.seed)
        return train_idx, ds, val_idx
    return np.arange(len(ds)), None, np.zeros(0, dtype=np.int64)


def _streams(cfg: TrainConfig, env: DistEnv, resumed_mode: str | None) -> StreamSource | None:
    """`cfg.data` as a stream when it should be one, else None (the decode cache reads it).

    --stream / --cache decide; a resumed run reads its data as it started (`resumed_mode`); otherwise a
    classification source streams when its decoded array would pass `cache_limit()`, and the run says so.
    """
    if cfg.cache or resumed_mode == "cache":
        return None
    if cfg.stream or resumed_mode == "stream":
        if cfg.task != "classify":
            raise ValueError(f"--stream reads single-label classification data; --task {cfg.task} reads its own")
        return open_stream_source(cfg.data, cache_dir=cfg.cache_dir, progress=cfg.progress and env.is_main)
    if cfg.task != "classify" or not can_stream(cfg.data):
        return None
    src = open_stream_source(cfg.data, cache_dir=cfg.cache_dir, progress=cfg.progress and env.is_main)
    size, limit = estimated_cache_bytes(src, cfg.image_size), cache_limit()
    if size <= limit:
        return None
    if env.is_main:
        print(
            f"data: {len(src):,} images would decode to about {format_size(size)}, over the decode cache's limit of "
            f"{format_size(limit)} ($VITKIT_CACHE_LIMIT): streaming them instead (--cache forces the cache)"
        )
    return src


def resumed_data_mode(state: dict | None) -> str | None:
    """How the checkpoint `state` read its data: "stream" (a streaming loader's position), "cache", None (no state)."""
    if not state:
        return None
    ranks = (state.get("rng") or {}).get("ranks") or [{}]
    return "stream" if (ranks[0].get("loader") or {}).get("stream") else "cache"


def load_run_data(cfg: TrainConfig, env: DistEnv, resumed_mode: str | None = None) -> RunData:
    """Load `cfg.data` with the task's reader (through the decode cache) or as a stream (`_streams`), and split
    off the validation images; list unreadable files. `resumed_mode` ("stream" / "cache"): how the checkpoint
    being resumed read its data."""
    start = time.perf_counter()
    ds = _streams(cfg, env, resumed_mode)
    if ds is None:
        ds = task_class(cfg.task)().read(
            cfg.data, cache_dir=cfg.cache_dir, image_size=cfg.image_size, progress=cfg.progress and env.is_main
        )
    data = RunData(ds, *split_validation(cfg, ds), seconds=0.0)
    data.train_idx = data.train_idx[stratified_subset(ds.labels[data.train_idx], cfg.labels_fraction, cfg.seed)]
    data.seconds = time.perf_counter() - start
    if ds.skipped and env.is_main:
        shown = "; ".join(f"{f}: {r}" for f, r in ds.skipped[:5])
        print(f"skipped {len(ds.skipped)} unreadable file(s): {shown}{' ...' if len(ds.skipped) > 5 else ''}")
    return data


def make_task(cfg: TrainConfig, data: RunData) -> Task:
    """The run's task, with the options it takes from `cfg` and what it needs of the training targets (class
    weights); an option the task does not take is a ValueError."""
    return task_class(cfg.task).for_training(cfg, data.ds.labels[data.train_idx], data.num_classes)


# --------------------------------------------------------------------------------------------------- model
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


def _data_shape(cfg: TrainConfig, ds: ImageArrayDataset | StreamSource) -> tuple[tuple[int, int], int]:
    """((H, W), channels) of the data: the cached array's, or for a stream (images of every size, decoded to RGB)
    the run's --img-size, else STREAM_IMAGE_SIZE."""
    if isinstance(ds, StreamSource):
        size = cfg.image_size or STREAM_IMAGE_SIZE
        return ((size, size) if isinstance(size, int) else tuple(size)), 3
    return tuple(ds.images.shape[1:3]), int(ds.images.shape[3])


def _data_stats(ds: ImageArrayDataset | StreamSource, train_idx: np.ndarray):
    """Normalisation for a fresh model: the cached training images' own statistics; ImageNet's for a stream
    (photos of every size: nothing is decoded ahead to measure)."""
    if isinstance(ds, StreamSource):
        return IMAGENET_MEAN, IMAGENET_STD
    return channel_stats(ds.images if len(train_idx) == len(ds) else ds.images[np.sort(train_idx)])


def build_model(cfg: TrainConfig, ds: ImageArrayDataset | StreamSource, train_idx: np.ndarray) -> VisionTransformer:
    """A fresh model for `ds` (classes, channels, image size from the data) or a fine-tune of pretrained weights.

    A named `cfg.model` is built at `cfg.image_size` when one is given (as `vitkit finetune --img-size` does).
    """
    num_classes = len(ds.classes)
    data_size, data_channels = _data_shape(cfg, ds)
    size = {} if cfg.image_size is None else {"img_size": cfg.image_size}
    # progressive resizing feeds smaller batches early on; the model keeps accepting them once trained (the
    # position embedding is resampled only for another grid, so the full-size forward is unchanged)
    kwargs = {**cfg.model_kwargs, **({"dynamic_img_size": True} if cfg.progressive_sizes else {})}
    from ..interop.hub import names_weights  # a path or a Hub name: weights; a bare model name: random

    if cfg.model and names_weights(cfg.model):
        from ..interop import from_pretrained  # fine-tuning: keep its preprocessing, replace its head

        channels = {"in_chans": data_channels}  # RGB weights adapt to gray or 4-channel data (interop.adapt)
        model = from_pretrained(cfg.model, num_classes=num_classes, **{**size, **channels, **kwargs})
        model.labels = list(ds.classes)
        return model
    name, kw = (cfg.model, size) if cfg.model else default_model(data_size)
    if not cfg.model:
        kw["in_chans"] = data_channels
    model = create_model(name, **{**kw, "num_classes": num_classes, **kwargs})
    mean, std = _data_stats(ds, train_idx)
    pre = default_preprocess(model.cfg)
    model.preprocess = PreprocessConfig(
        input_size=model.cfg.img_size, mean=mean, std=std, interpolation=pre.interpolation, crop_pct=pre.crop_pct
    )
    model.labels = list(ds.classes)
    return model


def model_from_meta(meta: dict) -> VisionTransformer:
    """An untrained model shaped as a checkpoint's `model_meta` says (config, preprocessing, labels, task)."""
    model = VisionTransformer(
        ViTConfig.from_dict(meta["config"]), PreprocessConfig.from_dict(meta["preprocess"]), meta["labels"]
    )
    apply_task(model, meta.get("task"))
    return model


def build_or_restore_model(
    cfg: TrainConfig, data: RunData, state: dict | None, task: Task | None = None
) -> VisionTransformer:
    """The model with `task`'s head (None: as built), made with the seeded RNG (a resume then restores the RNG it
    had when it stopped)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if state:  # the checkpoint holds the weights, a whitened first layer's included: nothing is initialised again
        return model_from_meta(state["model_meta"])
    model = build_model(cfg, data.ds, data.train_idx)
    if task is not None:
        task.attach(model)
    if cfg.whiten_stem:
        whiten_stem(cfg, data, model)
    return model


def whitening_batches(data: RunData, model: VisionTransformer, seed: int, count: int = WHITEN_IMAGES):
    """A seeded sample of at most `count` training images as training feeds them to `model` (resized to its input,
    normalised), without the random augmentation, in batches of 256. numpy's own seeded generator picks them, so
    torch's random state (and with it the rest of the run) is the same with whitening on or off."""
    pick = np.sort(np.random.default_rng([seed, 0x3A17E]).permutation(data.train_idx)[:count])
    plain = AugmentConfig(random_crop_pad=0, hflip=False)
    tf = build_train_transform(plain, model.preprocess, data.num_classes, model.cfg.in_chans)
    for start in range(0, len(pick), 256):
        idx = pick[start : start + 256]
        x = torch.from_numpy(np.ascontiguousarray(data.ds.images[idx])).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
        yield tf(x, torch.zeros(len(idx), dtype=torch.int64))[0]


def whiten_stem(cfg: TrainConfig, data: RunData, model: VisionTransformer) -> None:
    """`cfg.whiten_stem`: the first conv of a fresh model's conv tokenizer set to the whitening filters of the
    training images' patches (vitkit/train/whiten.py); refused where there is no such layer or no such start."""
    from ..interop.hub import names_weights

    if cfg.model and names_weights(cfg.model):
        raise ValueError(
            f"whiten_stem initialises a fresh model's first layer; {cfg.model!r} brings trained weights (fine-tuning "
            "keeps them): drop whiten_stem"
        )
    conv = first_stem_conv(model)
    if isinstance(data.ds, StreamSource):
        raise ValueError(
            "whiten_stem measures the training images' patches before training and needs them decoded (the decode "
            "cache); this data streams: pass --cache, or drop whiten_stem"
        )
    whiten_conv(conv, whitening_batches(data, model, cfg.seed))


def describe(data: RunData, model: VisionTransformer) -> None:
    """Two lines: what the run trains on, and on what model."""
    ds = data.ds
    if isinstance(ds, StreamSource):
        shape = f"streamed, cropped to {model.preprocess.input_size[0]}x{model.preprocess.input_size[1]}"
    else:
        cache = f"{'read' if ds.from_cache else 'built'} in {data.seconds:.1f} s" if ds.cache_path else ""
        shape = f"{ds.images.shape[1]}x{ds.images.shape[2]} (decode cache {cache or f'{data.seconds:.1f} s'})"
    print(
        f"data: {ds.source}: {len(data.train_idx)} train / {len(data.val_idx)} val images, {data.num_classes} "
        f"classes, {shape}"
    )
    c = model.cfg
    print(
        f"model: {c.patch_size} patches, D={c.embed_dim}, depth {c.depth}, stem {c.stem}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; input {model.preprocess.input_size}"
    )


def check_combinations(cfg: TrainConfig) -> None:
    """Refuse the option combinations a run does not support, before any work."""
    if not cfg.data:
        raise ValueError("no --data given (and no checkpoint in the run folder to take it from)")
    if cfg.fsdp and cfg.ema_decay > 0:
        raise ValueError("--ema-decay is not supported with --fsdp (the EMA copy would not be sharded); drop one")
    if cfg.fsdp and cfg.compile:
        raise ValueError("--compile with --fsdp is not supported yet (untested); drop one")


def wrap_model(
    cfg: TrainConfig, core: VisionTransformer, env: DistEnv
) -> tuple[nn.Module, torch.optim.Optimizer, ModelEma | None]:
    """(the model to train: DDP / FSDP2 around `core` under torchrun, else `core`; its AdamW; the EMA or None)."""
    core.set_grad_checkpointing(cfg.grad_checkpointing)
    model = prepare_model(core, env, fsdp=cfg.fsdp)
    optimizer = build_optimizer(unwrap(model), cfg.lr, cfg.weight_decay, cfg.betas, cfg.layer_decay, cfg.optimizer_impl)
    ema = ModelEma(unwrap(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    if cfg.compile:
        # in place (nn.Module.compile): parameter names, checkpoints and the EMA copy (made above) stay as they are;
        # the training graph is built on the first step; evaluation runs eagerly (TrainingRun.evaluate)
        core.compile()
    return model, optimizer, ema


# ------------------------------------------------------------------------------------------------- loaders
def default_batch_size(train_images: int, grad_accum: int = 1) -> int:
    """128 images a step, halved (down to 16) while an epoch would have fewer than ~50 steps: a small data set then
    gets enough optimizer steps in a few epochs (digits, 1,618 training images: batch 32). A multiple of grad_accum."""
    batch = 128
    while batch > 16 and train_images < 50 * batch:
        batch //= 2
    return max(batch // grad_accum, 1) * grad_accum


def micro_batch(cfg: TrainConfig, data: RunData, env: DistEnv) -> int:
    """Images per micro-batch on each rank: batch_size / grad_accum (batch_size by default from the data's size),
    lowered (with a one-line warning) when the training images are fewer than one batch on every rank, so that a
    small data set still trains."""
    n, ranks = len(data.train_idx), env.world_size
    batch = cfg.batch_size or default_batch_size(n // ranks, cfg.grad_accum)
    if n >= batch * ranks:
        return batch // cfg.grad_accum
    micro = n // (ranks * cfg.grad_accum)
    on_ranks = f" x {ranks} ranks" if ranks > 1 else ""
    if micro < 1:
        raise ValueError(
            f"{data.ds.source}: {n} training images cannot fill one step ({cfg.grad_accum} micro-batch(es){on_ranks})"
        )
    if env.is_main:
        print(
            f"warning: {data.ds.source}: {n} training images are fewer than one batch ({batch}{on_ranks}); "
            f"the batch size is lowered to {micro * cfg.grad_accum}",
            file=sys.stderr,
        )
    return micro


def make_loaders(
    cfg: TrainConfig, data: RunData, core: VisionTransformer, env: DistEnv, task: Task | None = None
) -> tuple[BatchLoader, BatchLoader | None]:
    """(training loader: shuffled (or class-balanced: `cfg.sampler`), augmented, this rank's share; validation
    loader or None: this rank's share, or every image where the task's metrics do not add up over ranks)."""
    if isinstance(data.ds, StreamSource):
        return make_stream_loaders(cfg, data, core, env, task)
    in_chans = core.cfg.in_chans
    # on a GPU the pixel work of augmentation runs there: the host alone cannot feed a fast GPU (README)
    aug_device = env.device if env.device.type == "cuda" else None
    # a task whose targets move with the pixels (segmentation's masks) brings its own transforms
    task_train_tf = getattr(task, "train_transform", None)
    make_eval_tf = getattr(task, "eval_transform", None) or build_eval_transform
    if task_train_tf is not None:
        train_tf = task_train_tf(cfg.augment, core.preprocess, data.num_classes, in_chans, aug_device)
    else:
        train_tf = build_train_transform(cfg.augment, core.preprocess, data.num_classes, in_chans, aug_device, cfg.seed)
    if cfg.augment.alternate_flips and not getattr(train_tf, "takes_indices", False):
        raise ValueError(
            f"alternate_flips: the {cfg.task} task's training transform flips (or not) on its own and takes no "
            "image indices; drop alternate_flips"
        )
    eval_tf = make_eval_tf(core.preprocess, in_chans, aug_device)
    micro = micro_batch(cfg, data, env)
    weights = class_balanced_weights(data.ds.labels[data.train_idx]) if cfg.sampler == "balanced" else None
    loader = BatchLoader(
        data.ds,
        data.train_idx,
        micro,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
        rank=env.rank,
        world_size=env.world_size,
        transform=train_tf,
        weights=weights,
    )
    if data.val_ds is None or not len(data.val_idx):
        return loader, None
    # FSDP: every forward is collective, so every rank evaluates all; so does a task whose metrics rank every image
    # together (average precision)
    whole = cfg.fsdp or (task is not None and not task.shards_eval)
    val_loader = BatchLoader(
        data.val_ds,
        data.val_idx,
        max(256, micro),
        shuffle=False,
        drop_last=False,
        rank=0 if whole else env.rank,
        world_size=1 if whole else env.world_size,
        transform=eval_tf,
    )
    return loader, val_loader


def make_stream_loaders(
    cfg: TrainConfig, data: RunData, core: VisionTransformer, env: DistEnv, task: Task | None = None
) -> tuple[RandomAccessLoader | ShardLoader, RandomAccessLoader | ShardLoader | None]:
    """make_loaders for streamed data: worker processes decode and crop each image (RandomResizedCrop from the full
    image for training, the model's resize and centre crop for validation); the rest of the recipe runs on the
    batch, on the GPU when there is one. Tar shards are read in order (ShardLoader), other sources row by row."""
    if cfg.augment.alternate_flips:
        raise ValueError(
            "alternate_flips flips each image by its index in the data set and the epoch; streamed data (decoded "
            "in worker processes as it trains) hands the transform no indices: pass --cache to decode it once, or "
            "drop alternate_flips"
        )
    pre, in_chans = core.preprocess, core.cfg.in_chans
    aug_device = env.device if env.device.type == "cuda" else None
    train_tf = build_train_transform(batch_augment(cfg.augment), pre, data.num_classes, in_chans, aug_device)
    eval_tf = build_eval_transform(batch_preprocess(pre), in_chans, aug_device)
    micro = micro_batch(cfg, data, env)
    workers = cfg.workers if cfg.workers is not None else stream_workers()
    ranks = {"rank": env.rank, "world_size": env.world_size}
    train_op = TrainCrop(cfg.augment, pre)
    if data.ds.sequential:
        if cfg.sampler == "balanced":
            raise ValueError("--sampler balanced draws images at random; tar shards are read in order (drop it)")
        loader = ShardLoader(
            data.ds,
            data.train_idx,
            micro,
            train=True,
            op=train_op,
            transform=train_tf,
            seed=cfg.seed,
            workers=workers,
            **ranks,
        )
    else:
        weights = class_balanced_weights(data.ds.labels[data.train_idx]) if cfg.sampler == "balanced" else None
        loader = RandomAccessLoader(
            data.ds,
            data.train_idx,
            micro,
            op=train_op,
            workers=workers,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
            transform=train_tf,
            weights=weights,
            **ranks,
        )
    if data.val_ds is None or not len(data.val_idx):
        return loader, None
    whole = cfg.fsdp or (task is not None and not task.shards_eval)
    ranks = {"rank": 0, "world_size": 1} if whole else ranks
    batch, op = max(256, micro), EvalCrop(pre)
    if data.val_ds.sequential:
        val = ShardLoader(
            data.val_ds, data.val_idx, batch, train=False, op=op, transform=eval_tf, workers=workers, **ranks
        )
    else:
        val = RandomAccessLoader(
            data.val_ds,
            data.val_idx,
            batch,
            op=op,
            workers=workers,
            shuffle=False,
            drop_last=False,
            transform=eval_tf,
            **ranks,
        )
    return loader, val
