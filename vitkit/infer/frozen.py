"""Judging an encoder by its frozen features: k-NN and linear-probe accuracy on a labelled source.

An encoder trained without labels (MAE) has no head to evaluate; what it learnt shows in how well its pooled
features (`forward_head(tokens, pre_logits=True)`, the vector a new head would see) separate classes it never saw
labels for. Two standard judges, both on a seeded stratified split of one labelled source (the larger part is the
memory bank / the probe's training set, the held-out part the queries):

- k-NN (Wu et al. 2018, as in DINO's `eval_knn.py`): cosine similarity to the bank, the k nearest vote for their
  class with weight exp(similarity / T), T = 0.07. Weighted rather than plain-majority votes: a close neighbour
  counts more than the 20th, which is what DINO and MAE report, so the numbers compare.
- Linear probe: a logistic-regression head on the standardised features (MAE's probe puts a parameter-free
  BatchNorm before its linear layer for the same reason: MAE features have wildly different scales), fitted by
  L-BFGS (`interop.transfer.fit_linear_head`), so it needs no learning rate and takes seconds.

`frozen_eval` runs either or both on a model; `FrozenEvalEvery` is the same, every N epochs, for a training loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import ImageArrayDataset, load_source, stratified_split
from .embed import embed_array

KNN_K = 20
KNN_TEMPERATURE = 0.07  # DINO's eval_knn.py default
QUERY_FRACTION = 0.1  # `vitkit train`'s --val-split default: the queries are then the images a run held out


def split_bank_queries(labels: np.ndarray, query_fraction: float = QUERY_FRACTION, seed: int = 0):
    """(bank indices, query indices): a stratified split, the same as a training run's (train, val) split."""
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"the query fraction must be in (0, 1), got {query_fraction}")
    return stratified_split(labels, query_fraction, seed)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, num_classes) of each query from its k most cosine-similar bank rows.

    bank (N, D), bank_labels (N,) int64, queries (Q, D). Each neighbour adds exp(similarity / temperature) to its
    class; queries go in chunks so the (chunk, N) similarity matrix stays small.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.long()
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)  # (c, k)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Top-1 accuracy of the temperature-weighted cosine k-NN vote (see `knn_predict`) on the queries."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, temperature).argmax(dim=1)
    return float((pred == query_labels.long()).float().mean())


def probe_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Top-1 accuracy on the queries of a logistic-regression head fitted on the bank's standardised features."""
    from ..interop.transfer import fit_linear_head

    bank, queries = bank.float(), queries.float()
    mean, std = bank.mean(dim=0), bank.std(dim=0).clamp_min(1e-6)  # the bank's statistics only: no peeking
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    head = nn.Linear(bank.shape[1], num_classes)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    fit_linear_head(head, (bank - mean) / std, bank_labels.long(), weight_decay=weight_decay, max_iter=max_iter)
    with torch.no_grad():
        pred = head((queries - mean) / std).argmax(dim=1)
    return float((pred == query_labels.long()).float().mean())


@dataclass
class FrozenReport:
    """What `frozen_eval` measured; accuracies are None for a judge that was not asked for."""

    knn_top1: float | None
    probe_top1: float | None
    k: int
    bank: int  # images in the memory bank / the probe's training set
    queries: int  # held-out images the accuracies are measured on
    classes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "knn_top1": self.knn_top1,
            "probe_top1": self.probe_top1,
            "k": self.k,
            "bank": self.bank,
            "queries": self.queries,
            "classes": len(self.classes),
            "seconds": round(self.seconds, 2),
        }


def frozen_eval(
    model: nn.Module,
    data: ImageArrayDataset,
    *,
    knn: bool = True,
    probe: bool = False,
    k: int = KNN_K,
    query_fraction: float = QUERY_FRACTION,
    seed: int = 0,
    batch_size: int = 256,
    precision: str = "bf16",
) -> FrozenReport:
    """k-NN and / or linear-probe accuracy of `model`'s pooled features on a labelled dataset.

    The images go through the model's own evaluation preprocessing, batched, under bf16 autocast by default.
    The model is left in the train / eval mode it came in.
    """
    if len(data.classes) < 2:
        raise ValueError(f"{data.source}: k-NN and probe accuracy need labelled images of 2+ classes")
    start = time.perf_counter()
    bank_idx, query_idx = split_bank_queries(data.labels, query_fraction, seed)
    was_training = model.training
    feats = torch.from_numpy(embed_array(model, data.images, batch_size=batch_size, precision=precision))
    model.train(was_training)
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    bank, queries = (feats[bank_idx], labels[bank_idx]), (feats[query_idx], labels[query_idx])
    return FrozenReport(
        knn_top1=knn_accuracy(*bank, *queries, k=k) if knn else None,
        probe_top1=probe_accuracy(*bank, *queries) if probe else None,
        k=k,
        bank=len(bank_idx),
        queries=len(query_idx),
        classes=list(data.classes),
        seconds=time.perf_counter() - start,
    )


class FrozenEvalEvery:
    """k-NN accuracy on a labelled source every `every` epochs, for a training loop (e.g. MAE pretraining).

    The source is loaded once, on the first evaluation. Call it at each epoch end (and with force=True at the end
    of the run): it returns the report's dict on the epochs it runs, else None.

    Args:
        data: any `--data` spec with labels (folder of class folders, tar, csv, digits, cifar10 ...).
        every: evaluate when the epoch number is a multiple of this (0: never).
        probe: also fit the linear probe (seconds on tens of thousands of images).
    """

    def __init__(
        self,
        data: str,
        every: int,
        *,
        k: int = KNN_K,
        probe: bool = False,
        query_fraction: float = QUERY_FRACTION,
        seed: int = 0,
        cache_dir: str | None = None,
        precision: str = "bf16",
    ):
        self.spec, self.every, self.k, self.probe = data, every, k, probe
        self.query_fraction, self.seed, self.cache_dir, self.precision = query_fraction, seed, cache_dir, precision
        self._data: ImageArrayDataset | None = None

    def due(self, epoch: int) -> bool:
        return self.every > 0 and epoch > 0 and epoch % self.every == 0

    def __call__(self, model: nn.Module, epoch: int, force: bool = False) -> dict[str, Any] | None:
        """The report's dict when `epoch` is due (or `force`: e.g. at the end of the run), else None."""
        if not (self.due(epoch) or (force and self.every > 0)):
            return None
        if self._data is None:
            self._data = load_source(self.spec, cache_dir=self.cache_dir, progress=False)
        report = frozen_eval(
            model,
            self._data,
            k=self.k,
            probe=self.probe,
            query_fraction=self.query_fraction,
            seed=self.seed,
            precision=self.precision,
        )
        return report.to_dict()


__all__ = [
    "knn_predict",
    "knn_accuracy",
    "probe_accuracy",
    "split_bank_queries",
    "frozen_eval",
    "FrozenReport",
    "FrozenEvalEvery",
]
