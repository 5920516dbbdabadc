"""Semantic segmentation: a class for every pixel, from the encoder's patch grid.

Data: a folder with `images/` and `masks/` (index or palette PNGs, 255 = ignore), a tar of one, or an `image,mask`
CSV (vitkit.data.segmentation); image and mask are augmented together (vitkit.data.seg_transforms).

Heads (`--seg-head`), both over `model.forward_intermediates`' patch grids (B, D, h, w) after the encoder's final
norm, their class logits upsampled bilinearly to the image:
  * linear: one linear layer per patch token on the last block's grid (Segmenter's linear decoder, SETR-naive),
  * pyramid: four blocks' grids (evenly spaced through the depth) projected to a common width, upsampled to twice
    the grid, summed, then a 3x3 conv, a norm and a 1x1 conv to the classes: later blocks give what a patch
    is, earlier ones keep more of where its edges are.

The decoder is the model's `head`, and the model becomes a `SegmentationViT`, whose forward returns per-pixel
logits (B, K, H, W) at the input size: the trainer, `evaluate`, `predict`, `serve` and the exporters call the
model as they call a classifier. The checkpoint records {"name": "segment", "head", "layers", "width"} as
`model.task`; loading rebuilds the head from it (`register_task_head`).

Loss: per-pixel cross-entropy, ignoring 255. Metrics: a confusion matrix over the labelled pixels of every
evaluated image, then per-class IoU, their mean (mIoU, over the classes present in the labels or the predictions)
and pixel accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.seg_transforms import DEFAULT_SCALE, SegEvalTransform, SegTrainTransform
from ..data.segmentation import IGNORE_INDEX, SegmentationDataset, load_segmentation_source, random_split
from ..model.serialization import register_task_head
from ..model.vit import VisionTransformer

HEADS = ("linear", "pyramid")
PYRAMID_LEVELS = 4
MAX_WIDTH = 4096  # a recorded decoder width beyond this is a damaged file, not a model


# ----------------------------------------------------------------------------------------------------- heads


def pyramid_layers(depth: int, levels: int = PYRAMID_LEVELS) -> tuple[int, ...]:
    """`levels` block indices spread evenly through `depth` blocks, the last block last: 12 -> (2, 5, 8, 11).

    A model with fewer blocks than levels gives every block once."""
    return tuple(sorted({max(round((i + 1) * depth / levels) - 1, 0) for i in range(levels)}))


def pyramid_width(embed_dim: int) -> int:
    """The decoder's channel count: a third of the encoder's width in multiples of 8 (its GroupNorm's groups),
    between 32 and 128, so that the decoder stays light next to the encoder."""
    return int(min(128, max(32, embed_dim // 3 // 8 * 8)))


class LinearDecoder(nn.Module):
    """The last grid (B, D, h, w) -> class logits (B, K, h, w): one linear map per patch token (a 1x1 conv)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.classify = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        nn.init.trunc_normal_(self.classify.weight, std=0.02)
        nn.init.zeros_(self.classify.bias)

    def forward(self, grids: list[torch.Tensor]) -> torch.Tensor:
        return self.classify(grids[-1])


class PyramidDecoder(nn.Module):
    """Several grids (B, D, h, w) -> class logits (B, K, 2h, 2w): project, upsample, sum, conv, classify."""

    def __init__(self, embed_dim: int, num_classes: int, levels: int, width: int):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, width, kernel_size=1) for _ in range(levels))
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(math.gcd(8, width), width),  # batch-size independent: one image predicts as a batch does
            nn.GELU(),
        )
        self.classify = nn.Conv2d(width, num_classes, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, grids: list[torch.Tensor]) -> torch.Tensor:
        h, w = grids[-1].shape[-2:]
        size = (2 * h, 2 * w)
        fused = sum(
            F.interpolate(proj(g), size=size, mode="bilinear", align_corners=False)  # (B, width, 2h, 2w)
            for proj, g in zip(self.project, grids)
        )
        return self.classify(self.fuse(fused))  # (B, K, 2h, 2w)


def build_decoder(head: str, embed_dim: int, num_classes: int, layers: Sequence[int], width: int) -> nn.Module:
    """The decoder called `head` ("linear" | "pyramid") for an encoder of width `embed_dim`."""
    if head == "linear":
        return LinearDecoder(embed_dim, num_classes)
    if head == "pyramid":
        return PyramidDecoder(embed_dim, num_classes, len(layers), width)
    raise ValueError(f"unknown segmentation head {head!r}; use one of {', '.join(HEADS)}")


class SegmentationViT(VisionTransformer):
    """The ViT with a segmentation decoder as its `head`: image (B, C, H, W) -> per-pixel logits (B, K, H, W).

    Built by `make_segmenter` from a VisionTransformer (a fresh one, a loaded classifier, a loaded checkpoint's
    skeleton); the encoder's modules and their weight names stay as they are.
    """

    decoder_layers: tuple[int, ...] = ()  # the blocks whose patch grids the head reads

    def final_norm(self) -> nn.Module:
        """The encoder's last LayerNorm: `norm`, or `fc_norm` for models that normalise after average pooling."""
        return self.fc_norm if self.cfg.use_fc_norm else self.norm

    def patch_grids(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's inputs: each chosen block's patch tokens, normalised, as grids (B, D, h, w)."""
        inter = self.forward_intermediates(x, indices=list(self.decoder_layers), stop_early=True)
        norm = self.final_norm()
        return [norm(level.patches.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for level in inter.layers]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh decoder of the same kind for `num_classes` (fine-tuning a segmentation model on other classes)."""
        super().reset_classifier(num_classes, global_pool)
        make_segmenter(self, self.task)

    def forward(self, x: torch.Tensor, return_attention: Any = None) -> torch.Tensor:
        """Image (B, C, H, W) -> class logits per pixel (B, K, H, W)."""
        if return_attention is not None:
            raise ValueError("a segmentation model gives per-pixel logits; ask forward_intermediates for attention")
        logits = self.head(self.patch_grids(x))  # (B, K, h', w') at the grid (or twice it)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def make_segmenter(model: VisionTransformer, task: dict[str, Any]) -> None:
    """Turn `model` into a SegmentationViT with the decoder `task` describes (its head, layers and width).

    Registered as the "segment" task's head builder: loading a checkpoint calls it on the model's skeleton before
    the weights load, and `SegmentTask.attach` on a model about to be trained.
    """
    depth = len(model.blocks)
    head = task.get("head", "linear")
    try:
        layers = tuple(int(i) for i in task.get("layers") or (depth - 1,))
        width = int(task.get("width") or pyramid_width(model.cfg.embed_dim))
    except (TypeError, ValueError):
        raise ValueError(
            f"malformed segmentation head {task!r}: layers must be block indices, width an integer"
        ) from None
    if not layers or any(not 0 <= i < depth for i in layers):
        raise ValueError(f"segmentation head layers {layers} are outside the model's {depth} blocks")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"segmentation head width {width} is outside 1..{MAX_WIDTH}")
    ref = next(model.parameters())
    decoder = build_decoder(head, model.cfg.embed_dim, model.cfg.num_classes, layers, width)
    model.head = decoder.to(device=ref.device, dtype=ref.dtype)
    model.__class__ = SegmentationViT  # same modules and weights, the per-pixel forward
    model.decoder_layers = layers
    model.task = dict(task)


register_task_head("segment", make_segmenter)


# -------------------------------------------------------------------------------------------- loss, metrics


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy in fp32 over the labelled pixels: logits (B, K, H, W), masks (B, H', W') int64
    (255 = ignore); logits are upsampled to the masks' size when they differ."""
    logits = logits.float()
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX)


def iou_from_confusion(confusion: torch.Tensor) -> dict[str, Any]:
    """{"miou", "pixel_acc", "per_class_iou", "per_class_acc"} of a (K, K) confusion (rows true, columns predicted).

    A class that is neither in the labels nor in the predictions has no IoU (None) and does not count in the mean;
    a class in the labels that is never predicted has IoU 0 and counts.
    """
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    truth = conf.sum(1)
    per_class_iou = [float(t / u) if u > 0 else None for t, u in zip(tp.tolist(), union.tolist())]
    per_class_acc = [float(t / n) if n > 0 else None for t, n in zip(tp.tolist(), truth.tolist())]
    present = [v for v in per_class_iou if v is not None]
    total = conf.sum().item()
    return {
        "miou": float(np.mean(present)) if present else 0.0,
        "pixel_acc": tp.sum().item() / total if total else 0.0,
        "per_class_iou": per_class_iou,
        "per_class_acc": per_class_acc,
    }


class SegmentationMetrics:
    """A confusion matrix over every labelled pixel of one evaluation, and the summed per-pixel cross-entropy."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
        self.loss_sum, self.pixels, self.n = 0.0, 0, 0

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """logits (B, K, h, w) float32, masks (B, H, W) int64 (255 = ignore); logits upsampled to the masks."""
        k = self.num_classes
        logits = logits.float()
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        masks = masks.long()
        labelled = masks != IGNORE_INDEX
        self.loss_sum += F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum").item()
        truth, pred = masks[labelled], logits.argmax(dim=1)[labelled]
        inside = truth < k  # a label beyond the model's classes cannot be scored (the reader refuses such masks)
        self.confusion += torch.bincount((truth[inside] * k + pred[inside]).cpu(), minlength=k * k)
        self.pixels += int(labelled.sum().item())
        self.n += masks.shape[0]

    def result(self) -> dict[str, Any]:
        """{"miou", "pixel_acc", "per_class_iou", "per_class_acc", "loss" (mean over labelled pixels), "n" (images),
        "pixels" (labelled pixels)}."""
        k = self.num_classes
        return {
            **iou_from_confusion(self.confusion.view(k, k)),
            "loss": self.loss_sum / max(self.pixels, 1),
            "n": self.n,
            "pixels": self.pixels,
        }


# -------------------------------------------------------------------------------------------- predictions


@dataclass
class SegmentationPrediction:
    """One image's predicted class map and what share of it each class covers."""

    image: str
    mask: np.ndarray  # (H, W) uint8 class indices
    labels: Sequence[str]  # index -> class name
    confidence: np.ndarray | None = field(default=None, repr=False)  # (H, W) float32 softmax of the chosen class

    def coverage(self) -> list[dict[str, Any]]:
        """The classes present, largest share first: [{"label", "index", "fraction"}]."""
        counts = np.bincount(self.mask.ravel(), minlength=len(self.labels))
        total = max(int(self.mask.size), 1)
        order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
        return [{"label": self.labels[i], "index": i, "fraction": round(counts[i] / total, 6)} for i in order]

    def to_dict(self, with_mask: bool = False) -> dict[str, Any]:
        """{"image", "height", "width", "classes": coverage()}; with_mask adds "mask" as rows of class indices."""
        d = {"image": self.image, "height": int(self.mask.shape[0]), "width": int(self.mask.shape[1])}
        d["classes"] = self.coverage()
        if with_mask:
            d["mask"] = self.mask.tolist()
        return d


def class_maps(
    logits: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(B, K, h, w) logits -> per image (class map (H, W) uint8, confidence (H, W) float32), each at its `sizes`
    entry (its own picture's size; None: the logits' size), upsampled bilinearly before the argmax."""
    out = []
    for i in range(logits.shape[0]):
        lg = logits[i : i + 1].float()
        if sizes is not None and tuple(sizes[i]) != tuple(lg.shape[-2:]):
            lg = F.interpolate(lg, size=tuple(sizes[i]), mode="bilinear", align_corners=False)
        conf, idx = lg.softmax(dim=1).max(dim=1)  # (1, H, W)
        out.append((idx[0].to(torch.uint8).cpu().numpy(), conf[0].cpu().numpy()))
    return out


# ------------------------------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class SegmentTask:
    """A class per pixel: images + masks, a decoder over the patch grids, per-pixel cross-entropy, mIoU."""

    name: ClassVar[str] = "segment"
    headline: ClassVar[str] = "miou"
    shards_eval: ClassVar[bool] = False  # the counts would add up over ranks; until the trainer sums a task's
    # counts itself, every rank evaluates every image

    head: str = "linear"
    layers: tuple[int, ...] | None = None  # None: chosen for the model's depth when the head is attached
    width: int | None = None  # the pyramid's channels (None: pyramid_width of the encoder)
    scale: tuple[float, float] = DEFAULT_SCALE  # the training zoom range
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"--seg-head must be one of {', '.join(HEADS)}, got {self.head!r}")

    @classmethod
    def for_training(cls, options: Any, targets: np.ndarray, num_classes: int) -> SegmentTask:
        if num_classes > IGNORE_INDEX:
            raise ValueError(f"{num_classes} classes; segmentation masks hold at most {IGNORE_INDEX} (255 = ignore)")
        if getattr(options, "loss", None) not in (None, "ce"):
            raise ValueError(f"--loss {options.loss} is not a segmentation loss; --task segment takes ce")
        if getattr(options, "class_weights", None) is not None or getattr(options, "sampler", "shuffle") != "shuffle":
            raise ValueError("--class-weights and --sampler balanced count one class per image; not for --task segment")
        aug = getattr(options, "augment", None)
        if aug is not None and (aug.mixes or aug.auto_augment):
            raise ValueError(
                "--mixup, --cutmix and --auto-augment move or blend images without their masks; "
                "--task segment augments with its own joint scale, crop and flip"
            )
        hflip = True if aug is None or aug.hflip is None else bool(aug.hflip)
        return cls(head=getattr(options, "seg_head", None) or "linear", hflip=hflip)

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> SegmentTask:
        spec = spec or {}
        layers = spec.get("layers")
        return cls(head=spec.get("head", "linear"), layers=tuple(layers) if layers else None, width=spec.get("width"))

    def spec(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "head": self.head}
        if self.layers is not None:
            d["layers"] = list(self.layers)
        if self.width is not None:
            d["width"] = self.width
        return d

    def read(
        self,
        spec: str,
        *,
        cache_dir: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        progress: bool = True,
        classes: Sequence[str] | None = None,
    ) -> SegmentationDataset:
        return load_segmentation_source(
            spec, cache_dir=cache_dir, image_size=image_size, progress=progress, classes=classes
        )

    def split(self, targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return random_split(len(targets), fraction, seed)

    def decoder_spec(self, model: VisionTransformer) -> dict[str, Any]:
        """spec() with the layers and width filled in for `model`'s depth and width."""
        depth, dim = len(model.blocks), model.cfg.embed_dim
        layers = self.layers or ((depth - 1,) if self.head == "linear" else pyramid_layers(depth))
        d = {"name": self.name, "head": self.head, "layers": list(layers)}
        if self.head == "pyramid":
            d["width"] = self.width or pyramid_width(dim)
        return d

    def attach(self, model: VisionTransformer) -> None:
        """A fresh decoder on `model`'s encoder (whatever head it had), which becomes a SegmentationViT. Its
        preprocessing stops center-cropping: a class map is wanted for every pixel of the picture."""
        make_segmenter(model, self.decoder_spec(model))
        model.preprocess = replace(model.preprocess, crop_pct=1.0)

    def train_transform(self, aug: Any, pre: Any, num_classes: int, in_chans: int = 3, device: Any = None):
        """Joint random scale, crop and flip of images and masks (vitkit.data.seg_transforms)."""
        return SegTrainTransform(pre, in_chans, self.scale, self.hflip, device)

    def eval_transform(self, pre: Any, in_chans: int = 3, device: Any = None):
        """The whole image at the input size; masks at their own size."""
        return SegEvalTransform(pre, in_chans, device)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(logits, targets)

    def metrics(self, num_classes: int) -> SegmentationMetrics:
        return SegmentationMetrics(num_classes)

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        return {"miou": result["miou"], "pixel_acc": result["pixel_acc"]}

    def predictions(
        self, logits: torch.Tensor, names: Sequence[str], labels: Sequence[str], topk: int = 5
    ) -> list[SegmentationPrediction]:
        return [
            SegmentationPrediction(name, mask, list(labels), conf)
            for name, (mask, conf) in zip(names, class_maps(logits))
        ]


__all__ = [
    "SegmentTask",
    "SegmentationViT",
    "SegmentationMetrics",
    "SegmentationPrediction",
    "LinearDecoder",
    "PyramidDecoder",
    "make_segmenter",
    "segmentation_loss",
    "iou_from_confusion",
    "class_maps",
    "pyramid_layers",
    "HEADS",
]
