"""Multi-label classification: any number of labels per image, one sigmoid per class.

Data: a CSV of `path,labels` rows, labels separated by `;` (vitkit.data.multilabel). Head: the model's linear head,
each output read as an independent logit. Loss: binary cross-entropy, or the asymmetric loss (`--loss asl`, Ridnik
et al. 2021: negatives' easy terms down-weighted and shifted, for data where most labels are absent from most
images). Both sum over the classes and average over the images, so they weigh a batch as cross-entropy does and
the same learning rates apply. Evaluation: average precision per class and its mean (mAP), and F1 at the
threshold. Prediction: every label whose probability is above the threshold the checkpoint records (0.5 unless
trained with another `--threshold`; `predict --threshold` overrides it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..data.multilabel import load_multilabel, random_split
from ..data.sources import ImageArrayDataset

if TYPE_CHECKING:
    from ..model.vit import VisionTransformer

LOSSES = ("bce", "asl")


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sigmoid binary cross-entropy in fp32, summed over classes and averaged over images: (B, K), (B, K) -> ()."""
    per_item = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_item.sum(dim=-1).mean()


def asymmetric_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05
) -> torch.Tensor:
    """The asymmetric loss (ASL, Ridnik et al. 2021) with the paper's defaults, summed over classes, averaged over
    images: a negative's probability is shifted down by `clip` (very easy negatives drop out) and its term focused
    by p**gamma_neg, so the many absent labels do not drown the few present ones."""
    logits, targets = logits.float(), targets.float()
    p = logits.sigmoid()
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p  # shifted probability of the negatives
    pos = F.logsigmoid(logits) * (1 - p).pow(gamma_pos)
    neg = torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg.pow(gamma_neg)
    return -(targets * pos + (1 - targets) * neg).sum(dim=-1).mean()


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Average precision of one class: sum over score thresholds of (recall gained) x precision, tied scores taken
    together (the definition scikit-learn's average_precision_score uses). None when the class has no positive."""
    targets = np.asarray(targets, dtype=np.float64)
    positives = targets.sum()
    if positives == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, t = np.asarray(scores)[order], targets[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last item of each run of equal scores
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_at(predicted: np.ndarray, targets: np.ndarray) -> tuple[list[float | None], float]:
    """(F1 per class (None for a class neither present nor predicted), micro F1 over every decision)."""
    predicted, targets = predicted.astype(bool), targets.astype(bool)
    tp = (predicted & targets).sum(axis=0)
    wrong = (predicted ^ targets).sum(axis=0)  # false positives + false negatives
    per_class = [float(2 * a / (2 * a + b)) if 2 * a + b > 0 else None for a, b in zip(tp, wrong)]
    micro = float(2 * tp.sum() / max(2 * tp.sum() + wrong.sum(), 1))
    return per_class, micro


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


class MultilabelMetrics:
    """Every image's logits and targets of one evaluation: average precision ranks them all together."""

    def __init__(self, num_classes: int, threshold: float):
        self.num_classes, self.threshold = num_classes, threshold
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (B, K) float32, targets (B, K) multi-hot."""
        self.logits.append(logits.detach().float().cpu())
        self.targets.append(targets.detach().cpu().to(torch.int64))

    def result(self) -> dict[str, Any]:
        """{"map" (mean AP over classes with a positive), "per_class_ap", "f1" (micro, at the threshold),
        "f1_macro", "per_class_f1", "threshold", "loss" (binary cross-entropy), "n"}."""
        k = self.num_classes
        logits = torch.cat(self.logits) if self.logits else torch.zeros(0, k)
        targets = torch.cat(self.targets) if self.targets else torch.zeros(0, k, dtype=torch.int64)
        n = int(logits.shape[0])
        scores, truth = logits.numpy(), targets.numpy()
        per_class_ap = [average_precision(scores[:, c], truth[:, c]) for c in range(k)]
        # p > threshold, decided on the logits: no float32 sigmoid saturation at extreme logits
        per_class_f1, micro = f1_at(scores > _logit(self.threshold), truth)
        loss = binary_cross_entropy(logits, targets).item() if n else math.nan
        return {
            "map": _mean(per_class_ap) or 0.0,
            "per_class_ap": per_class_ap,
            "f1": micro,
            "f1_macro": _mean(per_class_f1) or 0.0,
            "per_class_f1": per_class_f1,
            "threshold": self.threshold,
            "loss": loss,
            "n": n,
        }


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@dataclass
class LabelSet:
    """The labels of one image above the threshold (most probable first), and its top-k for context."""

    image: str
    indices: list[int]
    labels: list[str]
    probs: list[float]
    threshold: float
    top: list[dict[str, Any]]  # the k most probable labels, above the threshold or not

    def to_dict(self) -> dict[str, Any]:
        chosen = [{"label": lab, "index": i, "prob": p} for i, lab, p in zip(self.indices, self.labels, self.probs)]
        return {"image": self.image, "labels": chosen, "threshold": self.threshold, "top": self.top}


def label_sets(
    logits: torch.Tensor, names: Sequence[str], labels: Sequence[str], threshold: float, topk: int = 5
) -> list[LabelSet]:
    """(B, K) logits -> per image every label whose sigmoid probability is above `threshold`."""
    probs = logits.float().sigmoid()
    p_sorted, order = probs.sort(dim=-1, descending=True)  # (B, K)
    out = []
    for name, ps, idx in zip(names, p_sorted.tolist(), order.tolist()):
        top = [{"label": labels[i], "index": i, "prob": round(p, 6)} for p, i in zip(ps[:topk], idx[:topk])]
        above = [i for p, i in zip(ps, idx) if p > threshold]
        chosen = [round(p, 6) for p in ps[: len(above)]]  # sorted: the labels above come first
        out.append(LabelSet(name, above, [labels[i] for i in above], chosen, threshold, top))
    return out


def check_threshold(threshold: Any) -> float:
    """The threshold as a float in (0, 1), or ValueError saying so."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"the multi-label threshold must be a probability in (0, 1), got {threshold!r}")
    return float(threshold)


@dataclass(frozen=True)
class MultilabelTask:
    """Any number of labels per image: sigmoid outputs, BCE or ASL, mAP and F1, labels above a threshold."""

    name: ClassVar[str] = "multilabel"
    headline: ClassVar[str] = "map"
    shards_eval: ClassVar[bool] = False  # average precision ranks every image together: each rank evaluates all

    threshold: float = 0.5
    loss_name: str = "bce"

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        if self.loss_name not in LOSSES:
            raise ValueError(f"--task multilabel takes --loss {' or '.join(LOSSES)}, not {self.loss_name!r}")

    @classmethod
    def for_training(cls, options: Any, targets: np.ndarray, num_classes: int) -> MultilabelTask:
        if options.class_weights is not None:
            raise ValueError("--class-weights is for single-label data (--task classify); use --loss asl instead")
        if options.sampler != "shuffle":
            raise ValueError(f"--sampler {options.sampler} needs one class per image; --task multilabel has several")
        return cls(threshold=options.threshold, loss_name=options.loss or "bce")

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> MultilabelTask:
        return cls(threshold=(spec or {}).get("threshold", 0.5))

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold}

    def read(
        self,
        spec: str,
        *,
        cache_dir: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        progress: bool = True,
        classes: Sequence[str] | None = None,
    ) -> ImageArrayDataset:
        return load_multilabel(spec, cache_dir=cache_dir, image_size=image_size, progress=progress, classes=classes)

    def split(self, targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return random_split(len(targets), fraction, seed)

    def attach(self, model: VisionTransformer) -> None:
        model.task = self.spec()  # the linear head, each output an independent logit

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return asymmetric_loss(logits, targets) if self.loss_name == "asl" else binary_cross_entropy(logits, targets)

    def metrics(self, num_classes: int) -> MultilabelMetrics:
        return MultilabelMetrics(num_classes, self.threshold)

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        return {"map": result["map"], "f1": result["f1"]}

    def predictions(
        self, logits: torch.Tensor, names: Sequence[str], labels: Sequence[str], topk: int = 5
    ) -> list[LabelSet]:
        return label_sets(logits, names, labels, self.threshold, topk)
