"""BatchLoader: deterministic, resumable, shardable batches from an in-memory (or memmapped) image array.

The order of an epoch is a permutation seeded by (seed, epoch) alone, so it is the same on every machine and
after every restart; `state_dict()` records how far into the epoch we are, and `load_state_dict` continues at
exactly the next batch. Transforms run in the iterating thread and draw from torch's global RNG, so saving
`torch.get_rng_state()` next to `state_dict()` makes a resumed run bit-identical.

With sampling `weights` (`class_balanced_weights`: every class drawn equally often) an epoch is as many draws with
replacement, seeded by (seed, epoch) just the same, so a weighted epoch resumes exactly too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .sources import ImageArrayDataset


def _takes_targets(transform: Callable) -> bool:
    """Train transforms map (x, y) -> (x, y); eval transforms map x -> x."""
    flag = getattr(transform, "takes_targets", None)
    if flag is not None:
        return bool(flag)
    try:
        params = [
            p
            for p in inspect.signature(transform).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def _takes_indices(transform: Callable) -> bool:
    """A train transform that opts in (`takes_indices`, e.g. alternating flips) is also given each image's dataset
    index and the epoch: transform(x, y, indices=, epoch=). The others keep their (x, y) call."""
    return bool(getattr(transform, "takes_indices", False))


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling weights (N,) for class indices (N,): 1 / (images of the class), so each class is drawn equally."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("balanced sampling needs one class per image (labels (N,)); multi-label data has none")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def _sampling_probs(weights: np.ndarray, n: int, shuffle: bool) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if not shuffle:
        raise ValueError("sampling weights draw a random epoch; they need shuffle=True")
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} finite non-negative numbers, not all zero (one per index)")
    return w / w.sum()


class BatchLoader:
    """Batches of (uint8 images (B, C, H, W), int64 labels (B,)) from `ds` restricted to `indices`.

    Args:
        ds: the dataset (images (N, H, W, C) uint8).
        indices: which samples to use (e.g. from `stratified_split`).
        batch_size: samples per batch on each rank.
        shuffle: a new permutation each epoch, seeded by (seed, epoch).
        seed: base seed of the permutation.
        drop_last: drop the last incomplete batch (and, with several ranks, the batches that would leave ranks
            with unequal step counts).
        rank, world_size: this process takes global batches rank, rank + world_size, ...
        transform: `transform(x, y) -> (x, y)` (train) or `transform(x) -> x` (eval), applied per batch; one whose
            `takes_indices` is true is called as transform(x, y, indices=dataset indices (B,), epoch=epoch).
        weights: one sampling weight per entry of `indices`: an epoch then draws len(indices) samples with
            replacement, each with probability proportional to its weight (needs shuffle=True).
    """

    def __init__(
        self,
        ds: ImageArrayDataset,
        indices: np.ndarray | None,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable | None = None,
        weights: np.ndarray | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.ds = ds
        self.indices = np.arange(len(ds.labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError(f"{ds.source}: no samples to load (empty index set)")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self._pairs = transform is not None and _takes_targets(transform)
        self._indexed = self._pairs and _takes_indices(transform)
        self.probs = None if weights is None else _sampling_probs(weights, len(self.indices), shuffle)
        self.epoch = 0
        self.batch_index = 0  # batches of this epoch already handed out by this rank

    # ------------------------------------------------------------------ order
    def _global_batches(self) -> int:
        n = len(self.indices)
        full, rest = divmod(n, self.batch_size)
        total = full + (1 if rest and not self.drop_last else 0)
        if self.drop_last:
            total -= total % self.world_size  # every rank takes the same number of steps
        return total

    def __len__(self) -> int:
        total = self._global_batches()
        return len(range(self.rank, total, self.world_size))

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """Sample indices of the whole epoch (all ranks), in the order they are batched."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return self.indices
        rng = np.random.default_rng([self.seed, epoch])
        if self.probs is not None:
            return self.indices[rng.choice(len(self.indices), size=len(self.indices), p=self.probs)]
        return self.indices[rng.permutation(len(self.indices))]

    def batch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of `epoch` as index arrays."""
        order = self.epoch_order(epoch)
        bs = self.batch_size
        return [order[g * bs : (g + 1) * bs] for g in range(self.rank, self._global_batches(), self.world_size)]

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Switch to `epoch` (from its start); the current epoch keeps its position, so resume survives it."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.batch_index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")

    # ------------------------------------------------------------------ batches
    def _fetch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(self.ds.images[idx]))  # (B, H, W, C) uint8
        x = x.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        y = torch.from_numpy(np.asarray(self.ds.labels[idx], dtype=np.int64))
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.batch_indices()
        while self.batch_index < len(batches):
            idx = batches[self.batch_index]
            x, y = self._fetch(idx)
            if self.transform is not None:
                if self._indexed:
                    x, y = self.transform(x, y, indices=idx, epoch=self.epoch)
                elif self._pairs:
                    x, y = self.transform(x, y)
                else:
                    x = self.transform(x)
            self.batch_index += 1  # counted before yielding: a checkpoint taken now resumes at the next batch
            yield x, y
        self.epoch += 1  # the epoch is complete: the next iteration starts the next one
        self.batch_index = 0
