"""Evaluation: a model's metrics on labelled images (its task's: top-1, top-5 and per-class accuracy for a
classifier; mAP, per-class AP and F1 for multi-label), and a confusion-matrix PNG.

`evaluate_batches` is the one place a model is run over evaluation batches; the counting is the task's
(`vitkit.tasks`), and training's `evaluate()` uses the same function, so the numbers in a run's log and those of
`vitkit evaluate` are the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import BatchLoader
from ..data.sources import ImageArrayDataset
from ..data.transforms import build_eval_transform
from ..tasks import ClassifyTask, Task, task_of
from .precision import autocast, model_for


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
    topk: int = 5,
    tta: bool | str = False,
    task: Task | None = None,
) -> dict:
    """Run `model` over (x float (B, C, H, W), targets) batches and count with `task`'s metrics.

    task: default single-label classification (top-k with k = min(topk, classes)).
    tta: test-time augmentation, as `tta_logits` does it: True or "flip" (each image with its mirror, one extra
    forward pass), "flip-translate" (also both mirror pairs shifted by a pixel, five extra passes). Off by default:
    training's validation and the reported accuracies are single-view unless said.

    Returns the task's result; for classification {"top1", "top5" (top-k), "loss" (mean cross-entropy), "n",
    "per_class" (accuracy per class, None for a class with no images), "confusion" ((K, K) int64, rows true,
    columns predicted)}.
    """
    device = torch.device(device)
    mode = tta_mode(tta)  # a misspelt mode fails before any forward pass
    metrics = (task or ClassifyTask(topk=topk)).metrics(num_classes)
    original, was_training = model, model.training
    model.eval()
    model, bf16 = model_for(model, precision)  # precision "int8" of a float model: a quantized copy
    amp = autocast(device, bf16)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with amp:
            logits = tta_logits(model, x, mode)  # (B, K), or per pixel (B, K, H, W)
        metrics.update(logits, y)
    original.train(was_training)
    return metrics.result()


TTA_MODES = ("flip", "flip-translate")


def tta_mode(tta: bool | str | None) -> str | None:
    """The test-time augmentation `tta` names: None (off) for False / None, "flip" for True, else `tta` itself
    when it is one of TTA_MODES."""
    if tta is None or tta is False:
        return None
    if tta is True:
        return "flip"
    if isinstance(tta, str) and tta in TTA_MODES:
        return tta
    raise ValueError(f"tta must be True, False or one of {', '.join(TTA_MODES)}; got {tta!r}")


def translated(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` (..., H, W) with its content moved `dy` pixels down and `dx` right (each -1, 0 or 1), the same size: padded
    by one pixel with reflection, then cropped, so no black border enters the view."""
    if max(abs(dy), abs(dx)) > 1:
        raise ValueError(f"translated() shifts by at most one pixel, got ({dy}, {dx})")
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def _mirror_mean(model: nn.Module, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of the outputs of `x` (`logits`, when already computed) and of its horizontal mirror; a per-pixel
    map of the mirror is mirrored back onto the image's pixels first."""
    logits = model(x).float() if logits is None else logits
    mirrored = model(x.flip(-1)).float()
    if mirrored.ndim == 4:
        mirrored = mirrored.flip(-1)
    return (logits + mirrored) / 2


def tta_logits(model: nn.Module, x: torch.Tensor, tta: bool | str | None) -> torch.Tensor:
    """`model`'s float outputs for the batch `x` under test-time augmentation `tta` (see `tta_mode`), each view one
    forward pass of the whole batch.

    "flip": the mean over the image and its mirror. "flip-translate" (airbench's level-2 TTA): that pair weighted
    0.5, plus the mirror pairs of the image shifted one pixel up-left and one pixel down-right (reflected border),
    0.25 each. Per-pixel outputs (segmentation maps, (B, K, H, W)) take "flip" only, which maps back exactly: a
    shifted view's map would have to be shifted back, inventing its border row, so "flip-translate" refuses them.
    """
    mode = tta_mode(tta)
    logits = model(x).float()
    if mode is None:
        return logits
    if mode == "flip-translate" and logits.ndim == 4:
        raise ValueError(
            "tta 'flip-translate' applies to per-image outputs (classification); this model returns per-pixel "
            "maps (segmentation): use tta 'flip'"
        )
    pair = _mirror_mean(model, x, logits)
    if mode == "flip":
        return pair
    up_left, down_right = (_mirror_mean(model, translated(x, d, d)) for d in (-1, 1))
    return 0.5 * pair + 0.25 * up_left + 0.25 * down_right


@dataclass
class EvalReport:
    top1: float
    top5: float
    loss: float
    n: int
    classes: list[str]
    per_class: dict[str, float | None]
    confusion: np.ndarray  # (K, K) rows = true class, columns = predicted
    confusion_png: Path | None = None
    skipped: list = field(default_factory=list)
    support: dict[str, int] = field(default_factory=dict)  # images per class

    @property
    def mean_recall(self) -> float | None:
        """The mean of the per-class accuracies (each class's recall) over classes with images: balanced accuracy,
        the fairer single number on imbalanced data."""
        present = [v for v in self.per_class.values() if v is not None]
        return sum(present) / len(present) if present else None

    def to_dict(self) -> dict:
        return {
            "task": "classify",
            "top1": self.top1,
            "top5": self.top5,
            "per_class": self.per_class,
            "mean_recall": self.mean_recall,
            "support": self.support,
            "loss": self.loss,
            "n": self.n,
            "confusion_png": str(self.confusion_png) if self.confusion_png else None,
            "skipped": len(self.skipped),
        }


@dataclass
class TaskReport:
    """The evaluation of a model whose task is not single-label classification: the task's result as it is,
    with per-class lists keyed by class name."""

    task: str
    result: dict[str, Any]
    classes: list[str]
    n: int
    skipped: list = field(default_factory=list)
    confusion_png: Path | None = None  # none drawn: the per-class numbers are the task's own

    def to_dict(self) -> dict:
        named = {
            k: dict(zip(self.classes, v)) if isinstance(v, list) and len(v) == len(self.classes) else v
            for k, v in self.result.items()
        }
        return {"task": self.task, **named, "skipped": len(self.skipped)}


def evaluate_model(
    model: nn.Module,
    ds: ImageArrayDataset,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    precision: str = "bf16",
    confusion_png: str | Path | None = None,
    tta: bool | str = False,
    task: Task | None = None,
) -> EvalReport | TaskReport:
    """Evaluate a VisionTransformer on `ds` with the preprocessing stored in the model (as predict does), with the
    metrics of the task it was trained for (an EvalReport for a classifier, else a TaskReport).

    The dataset's classes must be the model's labels, in order (`task.read(..., classes=model.labels)` does it).
    `task`: judge as this task instead of the recorded one (e.g. another multi-label threshold).
    """
    labels = list(model.labels) if model.labels else [str(i) for i in range(model.cfg.num_classes)]
    if len(ds.classes) > len(labels) or list(ds.classes) != labels[: len(ds.classes)]:
        raise ValueError(
            f"{ds.source}: classes {ds.classes[:10]} do not match the model's {labels[:10]}; load the "
            "data with classes=model.labels"
        )
    task = task or task_of(model)
    # a task whose targets move with the pixels (segmentation's masks) brings its own; otherwise classification's
    own_transform = getattr(task, "eval_transform", None)
    tf = (own_transform or build_eval_transform)(model.preprocess, model.cfg.in_chans)
    loader = BatchLoader(ds, indices, batch_size, shuffle=False, drop_last=False, transform=tf)
    device = next(model.parameters()).device
    res = evaluate_batches(model, loader, len(labels), device=device, precision=precision, tta=tta, task=task)
    if task.name != ClassifyTask.name:
        return TaskReport(task.name, res, labels, res["n"], skipped=list(ds.skipped))
    report = EvalReport(
        top1=res["top1"],
        top5=res["top5"],
        loss=res["loss"],
        n=res["n"],
        classes=labels,
        per_class=dict(zip(labels, res["per_class"])),
        confusion=res["confusion"].numpy(),
        skipped=list(ds.skipped),
        support=dict(zip(labels, res["confusion"].sum(dim=1).tolist())),
    )
    if confusion_png is not None:
        report.confusion_png = plot_confusion(report.confusion, labels, confusion_png, title=f"{ds.source}")
    return report


def plot_confusion(confusion: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (counts written in the cells when there are at most 20 classes)."""
    from ..optional import pyplot

    plt = pyplot("the confusion-matrix plot")
    k = len(labels)
    rows = confusion.sum(axis=1, keepdims=True).clip(min=1)
    frac = confusion / rows
    size = min(4 + 0.45 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ticks = range(k)
    if k <= 50:
        ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(ticks, labels, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        str(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (rows normalised) {title}"[:90], fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
