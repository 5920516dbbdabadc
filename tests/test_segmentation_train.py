"""Segmentation through the training verbs: `fit` learns the shapes, `vitkit train --task segment` and
`vitkit finetune --from CLASSIFIER --task segment` run end to end and save models that load with their head."""

import json

import pytest
import torch
import yaml

from vitkit.model.loading import load_model
from vitkit.tasks.segment import SegmentationViT

from .conftest import run_vitkit, tiny_model
from .segmentation_data import SHAPE_CLASSES, write_segmentation_folder

TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_segmentation_folder(tmp_path_factory.mktemp("seg") / "data", n=96, size=32, seed=1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    from vitkit.train import TrainConfig, fit

    out = tmp_path_factory.mktemp("run")
    before = torch.get_num_threads()
    cfg = TrainConfig(
        data=str(data),
        task="segment",
        seg_head="pyramid",
        val_split=0.2,
        out=str(out),
        model="vit_cifar_patch4_32",
        model_kwargs=TINY,
        epochs=20,
        lr=3e-3,
        batch_size=16,
        cache_dir=str(out / "cache"),
        progress=False,
        threads=1,
    )
    try:
        return fit(cfg)
    finally:
        torch.set_num_threads(before)


def test_a_tiny_run_segments_the_shapes_well_above_chance(trained):
    val = trained.val_raw
    # chance: "background" everywhere scores IoU ~0.7 on it and 0 on the squares, a mIoU near 0.25
    assert val["miou"] > 0.75, val
    assert val["pixel_acc"] > 0.9 and val["n"] == 19


def test_the_run_logs_miou_and_saves_a_model_that_loads_with_its_head(trained):
    records = [json.loads(line) for line in (trained.out_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "val"]
    assert len(epochs) >= 10 and all(0 <= r["val_miou"] <= 1 and "val_pixel_acc" in r for r in epochs)
    final = next(r for r in records if r["kind"] == "final")
    assert final["val_miou"] == pytest.approx(trained.val_raw["miou"])
    model = load_model(trained.model_path)
    assert isinstance(model, SegmentationViT) and model.task["head"] == "pyramid"
    assert model.labels == list(SHAPE_CLASSES) and model.preprocess.crop_pct == 1.0


def test_cli_train_and_finetune_from_a_classifier(data, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model_kwargs": TINY, "batch_size": 16, "threads": 1}))
    common = ["--data", str(data), "--task", "segment", "--epochs", "1", "--no-progress"]
    common += ["--cache-dir", str(tmp_path / "cache"), "--recipe", str(recipe)]
    out = tmp_path / "scratch"
    r = run_vitkit(["train", *common, "--seg-head", "linear", "--model", "vit_cifar_patch4_32", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_model(out / "model.safetensors").task["head"] == "linear"

    classifier = tiny_model("vit_cifar_patch4_32", img_size=32, patch_size=4, num_classes=4, **TINY)
    classifier.labels = ["a", "b", "c", "d"]
    source = classifier.save(tmp_path / "classifier.safetensors")
    tuned = tmp_path / "tuned"
    r = run_vitkit(["finetune", "--from", str(source), *common, "--seg-head", "pyramid", "--out", str(tuned)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finetune: validation miou " in r.stdout
    init = load_model(tuned / "init.safetensors")  # the classifier's encoder, a new 3-class start
    encoder = {k: v for k, v in classifier.state_dict().items() if not k.startswith("head")}
    assert all(torch.equal(init.state_dict()[k], v) for k, v in encoder.items())
    model = load_model(tuned / "model.safetensors")
    assert isinstance(model, SegmentationViT) and model.task["head"] == "pyramid"
    assert model.labels == list(SHAPE_CLASSES)


def test_a_paused_run_resumes_and_keeps_its_head_with_ema_weights(data, tmp_path, single_thread):
    from vitkit.train import TrainConfig, fit
    from vitkit.train.checkpoint import model_from_checkpoint

    base = dict(
        data=str(data),
        task="segment",
        seg_head="pyramid",
        out=str(tmp_path / "run"),
        model="vit_cifar_patch4_32",
        model_kwargs=TINY,
        epochs=2,
        batch_size=16,
        ema_decay=0.9,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    paused = fit(TrainConfig(**base, stop_after_steps=3))
    assert paused.model_path is None and paused.steps == 3
    done = fit(TrainConfig(**base))  # the same run, resumed from its last.ckpt
    assert done.finished and done.steps > 3 and "miou" in done.val_raw and "miou" in done.val_ema
    for model in (load_model(done.model_path), model_from_checkpoint(done.checkpoint_path)):
        assert isinstance(model, SegmentationViT) and model.task["head"] == "pyramid"
