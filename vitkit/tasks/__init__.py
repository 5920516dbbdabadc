"""Tasks: what the encoder is trained for. A task is a head plus its loss, metrics, data reader and prediction format.

    TASKS["classify"]     one class per image: softmax cross-entropy, top-k accuracy (vitkit's default)
    TASKS["multilabel"]   any number of labels per image: sigmoid + BCE / ASL, mAP and F1 at a threshold
    TASKS["segment"]      a class per pixel: a decoder over the patch grids, per-pixel cross-entropy, mIoU

`vitkit train --task NAME` picks one (default classify). The trainer, `evaluate`, `predict` and `serve` talk to a
task only through the `Task` protocol (base.py), so adding a task is a module here plus one line in `TASKS`
(docs/tasks.md). The package is called `tasks`, not `heads`: a head is one of five things a task brings, and the
CLI's word for the choice is `--task`.

A trained model records its task as `model.task` (e.g. {"name": "multilabel", "threshold": 0.5}); it travels in
the checkpoint's metadata (vitkit.model.serialization), so `task_of(model)` rebuilds the task from the file alone.
A task whose head is not the model's linear `head` registers a head builder with
`vitkit.model.serialization.register_task_head` when this package is imported, so loading rebuilds it.
"""

from __future__ import annotations

from typing import Any

from .base import Metrics, Task
from .classify import ClassifyTask
from .multilabel import MultilabelTask
from .segment import SegmentTask  # importing it registers the segmentation head for loading

TASKS: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "multilabel": MultilabelTask,
    "segment": SegmentTask,
}
DEFAULT_TASK = "classify"


def task_class(name: str) -> type[Task]:
    """The task called `name`; an unknown name is a ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_of(model: Any) -> Task:
    """The task a model was trained for, from the `model.task` its checkpoint recorded (none: classification)."""
    spec = getattr(model, "task", None)
    return task_class(spec["name"] if spec else DEFAULT_TASK).from_spec(spec)


__all__ = [
    "TASKS",
    "DEFAULT_TASK",
    "Task",
    "Metrics",
    "ClassifyTask",
    "MultilabelTask",
    "SegmentTask",
    "task_class",
    "task_of",
]
