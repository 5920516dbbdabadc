"""What every task provides: the `Task` protocol, and the `Metrics` accumulator its evaluation fills.

A task is a head plus its loss, metrics, data reader and prediction format. The trainer, `vitkit evaluate`,
`predict` and `serve` call these methods and know nothing else about the task, so adding one touches its own module
and the table in `vitkit/tasks/__init__.py` (docs/tasks.md walks through it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from ..data.sources import ImageArrayDataset
    from ..model.vit import VisionTransformer


class Metrics(Protocol):
    """Counts of one evaluation: fed batch by batch, read once at the end."""

    def update(self, output: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: the model's output (float32) and the loader's targets."""

    def result(self) -> dict[str, Any]:
        """The numbers (always "loss" and "n"; the task's `headline` among them)."""


class Task(Protocol):
    """One thing the encoder can be trained for (single-label classification, multi-label, segmentation ...).

    Instances are small frozen dataclasses: their fields are the task's options (label smoothing, threshold ...),
    `spec()` is what a checkpoint records of them, and `from_spec` rebuilds the task from a loaded model.
    """

    name: str  # the `--task` name, recorded in checkpoints
    headline: str  # the result key that ranks weights (higher is better): raw vs EMA at the end of a run
    shards_eval: bool  # True: each rank evaluates its share and the counts add up (False: every rank sees all)

    @classmethod
    def for_training(cls, options: Any, targets: np.ndarray, num_classes: int) -> Task:
        """The task a training run uses: `options` is its TrainConfig, `targets` the training images' targets
        (for statistics such as class weights). Raises ValueError for options the task does not take."""

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> Task:
        """The task a checkpoint recorded (`model.task`), ready to evaluate and predict."""

    def spec(self) -> dict[str, Any]:
        """What a checkpoint records: {"name": ..., and what prediction needs, e.g. the threshold}."""

    def read(
        self,
        spec: str,
        *,
        cache_dir: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        progress: bool = True,
        classes: Sequence[str] | None = None,
    ) -> ImageArrayDataset:
        """Images and their targets (`labels`) from a `--data` source; `classes` maps onto a model's classes."""

    def split(self, targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) indices holding out `fraction`, the same for the same seed."""

    def attach(self, model: VisionTransformer) -> None:
        """Fit the model's head to the task (its class count is the model's) and record `spec()` as model.task."""

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch, in fp32 (targets as the training transform returns them)."""

    def metrics(self, num_classes: int) -> Metrics:
        """An empty accumulator for one evaluation."""

    def summary(self, result: dict[str, Any]) -> dict[str, float]:
        """The few numbers a training log records of an evaluation result (besides its loss)."""

    def predictions(self, output: torch.Tensor, names: Sequence[str], labels: Sequence[str], topk: int) -> list:
        """The model's output for a batch -> one prediction per image (each with `to_dict()`)."""
