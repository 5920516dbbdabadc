"""Few-label transfer: `--labels-fraction` trains on a seeded stratified subset of the training split, and
fine-tuning a pretrained encoder gets MAE's defaults (layer decay, drop path 0.1, warmup over 5 % of the steps)."""

import json

import numpy as np
import pytest

from vitkit.data.sources import load_source, stratified_split, stratified_subset
from vitkit.train import TrainConfig
from vitkit.train.finetune import _with_finetune_defaults, finetune
from vitkit.train.schedule import WarmupCosine

from .conftest import tiny_model


def uneven_labels() -> np.ndarray:
    return np.repeat(np.arange(4), [50, 30, 11, 3])  # classes of 50, 30, 11 and 3 images


def test_the_subset_keeps_each_class_share_and_follows_the_seed():
    labels = uneven_labels()
    kept = stratified_subset(labels, 0.2, seed=0)
    assert np.bincount(labels[kept]).tolist() == [10, 6, 2, 1]  # round(n * 0.2), at least one per class
    assert (np.diff(kept) > 0).all() and kept.max() < len(labels)  # sorted, distinct, in range
    assert np.array_equal(kept, stratified_subset(labels, 0.2, seed=0))
    assert not np.array_equal(kept, stratified_subset(labels, 0.2, seed=1))
    assert len(stratified_subset(labels, 1.0, seed=0)) == len(labels)


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match="labels_fraction"):
        TrainConfig(data="digits", labels_fraction=fraction)


def test_finetune_trains_on_that_fraction_of_the_training_split(tmp_path, capsys, single_thread):
    source = tiny_model(
        "vit_digits_patch2_8", img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, num_heads=2
    ).save(tmp_path / "encoder.safetensors")
    res = finetune(source, "digits", out=tmp_path / "ft", labels_fraction=0.2, epochs=1, progress=False, threads=1)
    labels = load_source("digits", progress=False).labels
    train_idx, val_idx = stratified_split(labels, 0.1, 0)
    expected = len(stratified_subset(labels[train_idx], 0.2, 0))
    assert 0.18 * len(train_idx) < expected < 0.22 * len(train_idx)
    assert f"{expected} train / {len(val_idx)} val images" in capsys.readouterr().out
    info = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    batch = 16  # the default batch for a few hundred images (train/build.py default_batch_size)
    assert info["steps_per_epoch"] == expected // batch
    # fine-tuning's own defaults reached the run: warmup over 5 % of the steps, drop path 0.1
    assert info["config"]["warmup_fraction"] == 0.05 and info["config"]["layer_decay"] == 0.75
    assert res.val_top1 is not None
    from vitkit import from_pretrained

    assert from_pretrained(res.model_path).cfg.drop_path_rate == pytest.approx(0.1)


def test_a_recipe_or_flag_beats_the_finetune_defaults():
    model, train = _with_finetune_defaults(None, {}, {})
    assert model == {"drop_path_rate": 0.1} and train == {"lr": 5e-4, "warmup_fraction": 0.05}
    model, train = _with_finetune_defaults(None, {"drop_path_rate": 0.0}, {"warmup_epochs": 2.0, "lr": 1e-3})
    assert model == {"drop_path_rate": 0.0} and train == {"warmup_epochs": 2.0, "lr": 1e-3}
    model, train = _with_finetune_defaults("cifar10_budget", {}, {})  # the recipe sets lr and warmup_epochs
    assert train == {} and model == {"drop_path_rate": 0.1}


def test_warmup_fraction_follows_the_steps_through_a_relayout():
    s = WarmupCosine(1.0, 200, warmup_steps=0, warmup_fraction=0.05)
    assert s.warmup_steps == 10 and s.lr_at(4) == pytest.approx(0.5)
    s.relayout(400, at_step=3)  # a --minutes budget learns how many steps fit, still in warmup
    assert s.warmup_steps == 20 and s.lr_at(19) == pytest.approx(1.0)
