"""Evaluation: top-1, top-5 and per-class accuracy of a model on labelled images, and a confusion-matrix PNG.

`evaluate_batches` is the one place the metrics are computed; training's `evaluate()` uses it too, so the numbers
in a run's log and those of `vitkit evaluate` are the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import BatchLoader
from ..data.sources import ImageArrayDataset
from ..data.transforms import build_eval_transform


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "bf16",
    topk: int = 5,
    tta: bool = False,
) -> dict:
    """Run `model` over (x float (B, C, H, W), y int64 (B,)) batches and count.

    tta: average the logits of each image and its horizontal mirror (flip test-time augmentation; one extra
    forward pass). Off by default: training's validation and the reported accuracies are single-view unless said.

    Returns {"top1", "top5" (top-k, k = min(topk, classes)), "loss" (mean cross-entropy), "n", "per_class"
    (accuracy per class, None for a class with no images), "confusion" ((K, K) int64, rows true, columns predicted)}.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    k = min(topk, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    topk_correct, loss_sum, n = 0, 0.0, 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with amp:
            logits = model(x).float()  # (B, K)
            if tta:
                logits = (logits + model(x.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        topk_correct += (logits.topk(k, dim=-1).indices == y[:, None]).any(dim=-1).sum().item()
        confusion += torch.bincount((y * num_classes + logits.argmax(dim=-1)).cpu(), minlength=num_classes**2)
        n += y.shape[0]
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes)
    per_n = confusion.sum(dim=1)
    per_class = [confusion[c, c].item() / per_n[c].item() if per_n[c] > 0 else None for c in range(num_classes)]
    return {
        "top1": confusion.diag().sum().item() / max(n, 1),
        "top5": topk_correct / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "n": n,
        "per_class": per_class,
        "confusion": confusion,
    }


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

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "per_class": self.per_class,
            "loss": self.loss,
            "n": self.n,
            "confusion_png": str(self.confusion_png) if self.confusion_png else None,
            "skipped": len(self.skipped),
        }


def evaluate_model(
    model: nn.Module,
    ds: ImageArrayDataset,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    precision: str = "bf16",
    confusion_png: str | Path | None = None,
    tta: bool = False,
) -> EvalReport:
    """Evaluate a VisionTransformer on `ds` with the preprocessing stored in the model (as predict does).

    The dataset's classes must be the model's labels, in order (`load_source(..., classes=model.labels)` does it).
    """
    labels = list(model.labels) if model.labels else [str(i) for i in range(model.cfg.num_classes)]
    if len(ds.classes) > len(labels) or list(ds.classes) != labels[: len(ds.classes)]:
        raise ValueError(
            f"{ds.source}: classes {ds.classes[:10]} do not match the model's {labels[:10]}; load the "
            "data with classes=model.labels"
        )
    tf = build_eval_transform(model.preprocess, model.cfg.in_chans)
    loader = BatchLoader(ds, indices, batch_size, shuffle=False, drop_last=False, transform=tf)
    device = next(model.parameters()).device
    res = evaluate_batches(model, loader, len(labels), device=device, precision=precision, tta=tta)
    report = EvalReport(
        top1=res["top1"],
        top5=res["top5"],
        loss=res["loss"],
        n=res["n"],
        classes=labels,
        per_class=dict(zip(labels, res["per_class"])),
        confusion=res["confusion"].numpy(),
        skipped=list(ds.skipped),
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
