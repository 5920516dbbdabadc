"""The task table, classification's loss as the trainer always had it, class weights and the balanced sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model
from vitkit.data.loader import BatchLoader, class_balanced_weights
from vitkit.data.sources import ImageArrayDataset
from vitkit.data.transforms import soft_target_cross_entropy
from vitkit.model.serialization import TASK_HEADS, register_task_head
from vitkit.tasks import TASKS, ClassifyTask, MultilabelTask, task_class, task_of
from vitkit.tasks.classify import balanced_class_weights
from vitkit.train import TrainConfig


# ------------------------------------------------------------------------------------------------ the table
def test_the_table_holds_the_tasks_and_an_unknown_name_lists_them():
    assert {"classify", "multilabel"} <= set(TASKS)
    assert task_class("multilabel") is MultilabelTask
    with pytest.raises(ValueError, match="unknown task 'segmnt'.*classify.*multilabel"):
        task_class("segmnt")
    with pytest.raises(ValueError, match="known tasks: .*classify"):
        TrainConfig(data="digits", task="segmnt")


def test_train_flag_picks_the_task_classify_by_default():
    import argparse

    from vitkit.train.options import add_training_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    assert config_from_args(parser.parse_args(["--data", "x"])).task == "classify"
    assert config_from_args(parser.parse_args(["--data", "x", "--task", "multilabel"])).task == "multilabel"
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "x", "--task", "nope"])


def test_a_model_without_a_recorded_task_is_a_classifier():
    model = tiny_model()
    assert isinstance(task_of(model), ClassifyTask)
    MultilabelTask(threshold=0.3).attach(model)
    assert model.task == {"name": "multilabel", "threshold": 0.3}
    assert task_of(model) == MultilabelTask(threshold=0.3)


def test_a_registered_head_is_rebuilt_from_the_file_alone(tmp_path):
    """The hook a task with its own head (segmentation) relies on: the file's task names the builder."""

    def two_layer_head(model, task):
        d, k = model.cfg.embed_dim, model.cfg.num_classes
        model.head = torch.nn.Sequential(
            torch.nn.Linear(d, task["hidden"]), torch.nn.GELU(), torch.nn.Linear(task["hidden"], k)
        )

    register_task_head("two-layer-probe", two_layer_head)
    try:
        model = tiny_model()
        model.task = {"name": "two-layer-probe", "hidden": 7}
        two_layer_head(model, model.task)
        path = model.save(tmp_path / "m.safetensors")
        from vitkit import from_pretrained

        loaded = from_pretrained(path)
        assert loaded.task == model.task and loaded.head[0].out_features == 7
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    finally:
        TASK_HEADS.pop("two-layer-probe")
    from vitkit.model.serialization import CheckpointError

    with pytest.raises(CheckpointError, match="'two-layer-probe' model.*import vitkit.tasks"):
        from_pretrained(path)


# ------------------------------------------------------------------------------------------ classification
def test_classification_loss_is_the_trainers_cross_entropy():
    from vitkit.train.loop import compute_loss

    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    soft = torch.softmax(torch.randn(6, 5), dim=-1)
    task = ClassifyTask(label_smoothing=0.1)
    assert torch.equal(task.loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.equal(task.loss(logits, soft), soft_target_cross_entropy(logits, soft))
    assert torch.equal(compute_loss(logits, y, 0.1), task.loss(logits, y))
    uniform = ClassifyTask(label_smoothing=0.1, class_weights=(1.0,) * 5)
    torch.testing.assert_close(uniform.loss(logits, y), task.loss(logits, y))
    torch.testing.assert_close(uniform.loss(logits, soft), task.loss(logits, soft))


def test_balanced_class_weights_make_each_class_weigh_the_same():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    w = balanced_class_weights(labels, 4)  # class 3 has no image: weight 0
    assert w == pytest.approx((9 / (4 * 6), 9 / (4 * 2), 9 / (4 * 1), 0.0), abs=1e-6)
    counts = np.bincount(labels, minlength=4)
    assert np.allclose(counts[:3] * np.array(w[:3]), counts[0] * w[0])  # every present class: the same total weight
    logits, y = torch.randn(9, 4), torch.from_numpy(labels)
    weighted = ClassifyTask(class_weights=w).loss(logits, y)
    per = F.cross_entropy(logits, y, reduction="none")
    wt = torch.tensor(w)[y]
    torch.testing.assert_close(weighted, (per * wt).sum() / wt.sum())
    cfg = TrainConfig(data="digits", class_weights="balanced")
    assert ClassifyTask.for_training(cfg, labels, 4).class_weights == w


# ------------------------------------------------------------------------------------------ balanced sampler
def _imbalanced(n_major: int = 180, n_minor: int = 20) -> ImageArrayDataset:
    labels = np.r_[np.zeros(n_major, np.int64), np.ones(n_minor, np.int64)]
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2)  # id in pixels
    return ImageArrayDataset(images=images, labels=labels, classes=["major", "minor"], source="imbalanced")


def test_balanced_sampler_draws_classes_equally_seeded_and_resumable():
    ds = _imbalanced()
    weights = class_balanced_weights(ds.labels)

    def loader():
        return BatchLoader(ds, None, 20, seed=3, weights=weights)

    drawn = np.concatenate([y.numpy() for epoch in range(5) for _, y in loader_at(loader(), epoch)])
    assert abs(drawn.mean() - 0.5) < 0.05  # the minority class is 10 % of the data, half of the draws
    plain = np.concatenate([y.numpy() for _, y in BatchLoader(ds, None, 20, seed=3)])
    assert abs(plain.mean() - 0.1) < 1e-9
    first = [x.clone() for x, _ in loader()]
    assert all(torch.equal(a, b) for a, b in zip(first, (x for x, _ in loader())))  # same seed, same draws
    a = loader()
    it = iter(a)
    head = [next(it)[0] for _ in range(4)]
    b = loader()
    b.load_state_dict(a.state_dict())
    rest = [x for x, _ in b]
    assert len(head) + len(rest) == len(first)
    assert all(torch.equal(x, y) for x, y in zip(head + rest, first))


def loader_at(loader: BatchLoader, epoch: int) -> BatchLoader:
    loader.set_epoch(epoch)
    return loader


def test_balanced_sampler_refuses_multilabel_targets():
    with pytest.raises(ValueError, match="one class per image"):
        class_balanced_weights(np.zeros((4, 3), np.int64))
    cfg = TrainConfig(data="x.csv", task="multilabel", sampler="balanced")
    with pytest.raises(ValueError, match="--sampler balanced"):
        MultilabelTask.for_training(cfg, np.zeros((4, 3), np.int64), 3)


def test_a_class_balanced_run_resumes_exactly(tmp_path, single_thread):
    """--class-weights balanced and --sampler balanced through the trainer: stopping and resuming gives the same
    weights as one uninterrupted run (the weighted draws follow (seed, epoch) like the plain shuffle)."""
    from safetensors.torch import load_file

    from tests.conftest import tiny_digits_config
    from vitkit.train import fit
    from vitkit.train.fit import TrainingRun

    options = dict(epochs=1, class_weights="balanced", sampler="balanced", val_split=0.5)
    whole = fit(tiny_digits_config(tmp_path / "whole", **options))
    fit(tiny_digits_config(tmp_path / "paused", stop_after_steps=7, **options))
    resumed = fit(tiny_digits_config(tmp_path / "paused", **options))
    assert resumed.steps == whole.steps
    a, b = load_file(whole.model_path), load_file(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = TrainingRun(tiny_digits_config(tmp_path / "wiring", **options), None)  # the options reached the run
    assert run.loader.probs is not None and len(set(run.task.class_weights)) > 1


def test_evaluate_reports_per_class_recall_support_and_mean_recall():
    """A model that always answers 'a' on 6 a's and 2 b's: top-1 75 %, recall a 100 %, b 0 %, mean recall 50 %."""
    from vitkit.infer.evaluate import evaluate_model

    model = tiny_model(num_classes=2, labels=["a", "b"])
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([1.0, 0.0]))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0] * 6 + [1] * 2)
    ds = ImageArrayDataset(images=images, labels=labels, classes=["a", "b"], source="hand-made")
    report = evaluate_model(model, ds, precision="fp32").to_dict()
    assert report["top1"] == 0.75 and report["per_class"] == {"a": 1.0, "b": 0.0}
    assert report["support"] == {"a": 6, "b": 2} and report["mean_recall"] == 0.5
