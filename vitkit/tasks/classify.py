"""Single-label classification: the model's linear head, softmax cross-entropy, top-k accuracy, top-k predictions.

The loss is the one the trainer always used: soft targets (B, K) from MixUp/CutMix as they are, hard labels (B,)
with label smoothing; `--class-weights balanced` scales each class's terms by N / (K * images of the class), so
rare classes weigh as much in the loss as common ones. Evaluation counts a confusion matrix: top-1, top-k, and
per-class accuracy, which is each class's recall.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sources import ImageArrayDataset, load_source, stratified_split
from ..data.transforms import loss_label_smoothing, soft_target_cross_entropy

if TYPE_CHECKING:
    from ..model.vit import VisionTransformer


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy in fp32: soft targets (B, K) as they are, hard labels (B,) smoothed here.

    `weight` (K,) scales each class's terms; the mean is then over the weighted targets (torch's convention for a
    weighted cross-entropy), so uniform weights give the unweighted loss.
    """
    logits = logits.float()
    if targets.ndim == 2:
        if weight is None:
            return soft_target_cross_entropy(logits, targets)
        weighted = targets * weight  # (B, K)
        return -(weighted * logits.log_softmax(dim=-1)).sum() / weighted.sum().clamp(min=1e-12)
    return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """N / (K * images of class k) for each class (scikit-learn's "balanced"); 0 for a class with no image."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return tuple(round(float(w), 6) for w in weights)


@functools.lru_cache(maxsize=8)
def _weight_tensor(weights: tuple[float, ...], device: str) -> torch.Tensor:
    return torch.tensor(weights, dtype=torch.float32, device=device)


class ClassificationMetrics:
    """A confusion matrix, top-k hits and the summed cross-entropy over the batches of one evaluation."""

    def __init__(self, num_classes: int, topk: int = 5):
        self.num_classes = num_classes
        self.k = min(topk, num_classes)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
        self.topk_correct, self.loss_sum, self.n = 0, 0.0, 0

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """logits (B, K) float32, y (B,) int64."""
        k = self.num_classes
        self.loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        self.topk_correct += (logits.topk(self.k, dim=-1).indices == y[:, None]).any(dim=-1).sum().item()
        self.confusion += torch.bincount((y * k + logits.argmax(dim=-1)).cpu(), minlength=k**2)
        self.n += y.shape[0]

    def result(self) -> dict[str, Any]:
        """{"top1", "top5" (top-k), "loss" (mean cross-entropy), "n", "per_class" (accuracy, i.e. recall, per
        class; None for a class with no images), "confusion" ((K, K) int64, rows true, columns predicted)}."""
        k, n = self.num_classes, self.n
        confusion = self.confusion.view(k, k)
        per_n = confusion.sum(dim=1)
        per_class = [confusion[c, c].item() / per_n[c].item() if per_n[c] > 0 else None for c in range(k)]
        return {
            "top1": confusion.diag().sum().item() / max(n, 1),
            "top5": self.topk_correct / max(n, 1),
            "loss": self.loss_sum / max(n, 1),
            "n": n,
            "per_class": per_class,
            "confusion": confusion,
        }


@dataclass
class Prediction:
    """Top-k classes of one image, most probable first."""

    image: str
    indices: list[int]
    labels: list[str]
    probs: list[float]

    def to_dict(self) -> dict[str, Any]:
        top = [{"label": lab, "index": i, "prob": p} for i, lab, p in zip(self.indices, self.labels, self.probs)]
        return {"image": self.image, "top": top}


def top_k_predictions(
    logits: torch.Tensor, names: Sequence[str], labels: Sequence[str], k: int = 5
) -> list[Prediction]:
    """(B, classes) logits -> one Prediction per row: the k most probable classes with softmax probabilities."""
    probs = logits.float().softmax(dim=-1)
    p, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (B, k)
    return [
        Prediction(name, i.tolist(), [labels[j] for j in i.tolist()], [round(v, 6) for v in pr.tolist()])
        for name, pr, i in zip(names, p, idx)
    ]


@dataclass(frozen=True)
class ClassifyTask:
    """One class per image (today's vitkit): folder / tar / CSV / built-in sources, the model's linear head."""

    name: ClassVar[str] = "classify"
    headline: ClassVar[str] = "top1"
    shards_eval: ClassVar[bool] = True

    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None  # per-class loss weights (None: all 1)
    topk: int = 5  # the k of the top-k accuracy evaluation reports

    @classmethod
    def for_training(cls, options: Any, targets: np.ndarray, num_classes: int) -> ClassifyTask:
        if options.loss not in (None, "ce"):
            raise ValueError(f"--loss {options.loss} is not a single-label loss; --task classify takes ce")
        weights = balanced_class_weights(targets, num_classes) if options.class_weights == "balanced" else None
        return cls(label_smoothing=loss_label_smoothing(options.augment), class_weights=weights)

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> ClassifyTask:
        return cls()

    def spec(self) -> dict[str, Any]:
        return {"name": self.name}

    def read(
        self,
        spec: str,
        *,
        cache_dir: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        progress: bool = True,
        classes: Sequence[str] | None = None,
    ) -> ImageArrayDataset:
        return load_source(spec, cache_dir=cache_dir, image_size=image_size, progress=progress, classes=classes)

    def split(self, targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return stratified_split(targets, fraction, seed)

    def attach(self, model: VisionTransformer) -> None:
        model.task = self.spec()  # the model's own linear head is this task's head

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weights is None else _weight_tensor(self.class_weights, str(logits.device))
        return cross_entropy(logits, targets, self.label_smoothing, weight)

    def metrics(self, num_classes: int) -> ClassificationMetrics:
        return ClassificationMetrics(num_classes, self.topk)

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        return {"top1": result["top1"], "top5": result["top5"]}

    def predictions(
        self, logits: torch.Tensor, names: Sequence[str], labels: Sequence[str], topk: int = 5
    ) -> list[Prediction]:
        return top_k_predictions(logits, names, labels, topk)
