"""Multi-label classification: the CSV reader, BCE / ASL, average precision and F1, a tiny run that learns, and a
checkpoint that predicts with its own threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import PALETTE, run_vitkit, tiny_model, write_png
from vitkit.data.multilabel import load_multilabel, random_split, read_label_rows
from vitkit.data.sources import DataSourceError
from vitkit.tasks import MultilabelTask, task_of
from vitkit.tasks.multilabel import asymmetric_loss, average_precision, binary_cross_entropy, f1_at

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")  # PALETTE's order


def mosaic(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """A gray (size, size, 3) image whose four quadrants each hold a PALETTE colour patch (or stay gray) with
    probability 1/2; its labels are the colours present."""
    img = np.full((size, size, 3), 110, np.uint8)
    present = set()
    half = size // 2
    for qy in range(2):
        for qx in range(2):
            if rng.random() < 0.5:
                c = int(rng.integers(len(COLOURS)))
                img[qy * half : (qy + 1) * half, qx * half : (qx + 1) * half] = PALETTE[c]
                present.add(COLOURS[c])
    noise = rng.integers(-20, 21, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8), sorted(present)


def write_mosaics(folder, n: int, seed: int = 0) -> str:
    """folder/img/<i>.png mosaics and folder/labels.csv (path,labels); returns the CSV's path."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True)
    rows = ["path,labels"]
    for i in range(n):
        img, labels = mosaic(rng)
        write_png(folder / "img" / f"{i:04d}.png", img)
        rows.append(f"img/{i:04d}.png,{';'.join(labels)}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "labels.csv")


# ---------------------------------------------------------------------------------------------------- reading
def test_reads_path_labels_rows_into_multi_hot_targets(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        write_png(tmp_path / f"{name}.png", mosaic(rng)[0])
    (tmp_path / "labels.csv").write_text("path,labels\na.png,dog;cat\nb.png,\nc.png, cat ;;bird\n")
    ds = load_multilabel(str(tmp_path), cache_dir=tmp_path / "cache", progress=False)  # the folder form
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.labels.tolist() == [[0, 1, 1], [0, 0, 0], [1, 1, 0]]
    assert ds.images.shape == (3, 32, 32, 3)
    again = load_multilabel(str(tmp_path / "labels.csv"), cache_dir=tmp_path / "cache", progress=False)
    assert again.from_cache and again.labels.tolist() == ds.labels.tolist()
    onto = load_multilabel(str(tmp_path), cache_dir=tmp_path / "cache", classes=["dog", "cat", "bird", "fish"])
    assert onto.labels.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]]
    with pytest.raises(DataSourceError, match=r"labels \['bird'\] are not among"):
        load_multilabel(str(tmp_path), cache_dir=tmp_path / "cache", classes=["dog", "cat"])


def test_an_unreadable_image_is_skipped_and_the_targets_stay_aligned(tmp_path):
    rng = np.random.default_rng(1)
    write_png(tmp_path / "a.png", mosaic(rng)[0])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_png(tmp_path / "c.png", mosaic(rng)[0])
    (tmp_path / "labels.csv").write_text("a.png,x\nbroken.png,y\nc.png,z\n")
    ds = load_multilabel(str(tmp_path), cache_dir=tmp_path / "cache", progress=False)
    assert [name for name, _ in ds.skipped] == ["broken.png"]
    assert ds.classes == ["x", "y", "z"] and ds.labels.tolist() == [[1, 0, 0], [0, 0, 1]]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("path,labels\na.png,cat\nb.png,cat,dog\n", 3),  # labels separated by commas: three fields
        ("a.png,cat\nb.png\n", 2),  # no labels field at all
        ("a.png,cat\n\n,dog\n", 3),  # no path (blank lines keep their numbers)
    ],
)
def test_a_bad_row_names_its_line(tmp_path, text, line):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataSourceError, match=rf"line {line}: .* is not 'path,labels'"):
        read_label_rows(tmp_path / "labels.csv")


def test_a_folder_without_labels_csv_says_what_to_add(tmp_path):
    with pytest.raises(DataSourceError, match="has no labels.csv"):
        load_multilabel(str(tmp_path))


def test_random_split_is_seeded_and_holds_out_the_fraction():
    train, val = random_split(50, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40 and not set(train) & set(val)
    assert np.array_equal(val, random_split(50, 0.2, seed=1)[1])
    assert not np.array_equal(val, random_split(50, 0.2, seed=2)[1])


# ------------------------------------------------------------------------------------------ loss and metrics
def test_average_precision_by_hand_and_for_perfect_and_random_scorers():
    # ranks 1..4 hold positives at 1 and 3: precision 1/1 and 2/3 where recall rises -> AP 5/6
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts as one threshold: precision 1/2 at full recall
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert average_precision(np.array([0.3, 0.2]), np.array([0, 0])) is None  # no positive: undefined
    rng = np.random.default_rng(0)
    targets = (rng.random((4000, 5)) < 0.2).astype(np.int64)
    perfect = [average_precision(targets[:, c] + 0.1 * rng.random(4000), targets[:, c]) for c in range(5)]
    assert perfect == pytest.approx([1.0] * 5)
    chance = np.mean([average_precision(rng.random(4000), targets[:, c]) for c in range(5)])
    assert chance == pytest.approx(0.2, abs=0.03)  # a random ranking's AP is the positives' share


def test_average_precision_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores, truth = rng.integers(0, 6, 60).astype(float), rng.integers(0, 2, 60)  # many ties
        assert average_precision(scores, truth) == pytest.approx(metrics.average_precision_score(truth, scores))


def test_metrics_give_map_and_f1_at_the_threshold():
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    logits = torch.tensor([[3.0, -2.0, -1.0], [1.0, 0.5, -3.0], [-1.0, 2.0, -2.0], [0.2, -0.1, -1.0]])
    m = MultilabelTask(threshold=0.5).metrics(3)
    m.update(logits[:2], targets[:2])
    m.update(logits[2:], targets[2:])
    res = m.result()
    assert res["per_class_ap"] == [pytest.approx(1.0), pytest.approx(1.0), None]  # class 2 never present
    assert res["map"] == pytest.approx(1.0) and res["n"] == 4
    # predicted (p > 0.5, i.e. logit > 0): class 0 rows 0, 1, 3 (one false positive); class 1 rows 1, 2
    per_class, micro = f1_at(logits.numpy() > 0, targets.numpy())
    assert per_class == [pytest.approx(2 * 2 / (2 * 2 + 1)), pytest.approx(1.0), None]
    assert res["f1"] == pytest.approx(micro) == pytest.approx(2 * 4 / (2 * 4 + 1))
    assert res["loss"] == pytest.approx(binary_cross_entropy(logits, targets).item())


def test_bce_and_asl_by_hand():
    logits, targets = torch.zeros(2, 3), torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert binary_cross_entropy(logits, targets).item() == pytest.approx(3 * np.log(2))  # summed over classes
    rnd = torch.randn(4, 5)
    hot = (torch.rand(4, 5) < 0.3).long()
    plain = asymmetric_loss(rnd, hot, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    torch.testing.assert_close(plain, binary_cross_entropy(rnd, hot))  # no focusing, no shift: BCE
    easy_negative = torch.tensor([[-4.0]])  # p = 0.018 < clip 0.05: ASL drops it entirely
    assert asymmetric_loss(easy_negative, torch.tensor([[0]])).item() == 0.0
    assert MultilabelTask(loss_name="asl").loss(rnd, hot) == asymmetric_loss(rnd, hot)


def test_options_the_multilabel_task_does_not_take_are_refused():
    from vitkit.train import TrainConfig

    with pytest.raises(ValueError, match="--class-weights is for single-label"):
        MultilabelTask.for_training(TrainConfig(data="x", class_weights="balanced"), np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="takes --loss bce or asl"):
        MultilabelTask.for_training(TrainConfig(data="x", loss="ce"), np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="probability in"):
        MultilabelTask(threshold=1.5)


# ------------------------------------------------------------------------------------- training and predicting
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny multi-label run on colour mosaics: (result, data folder)."""
    from vitkit.train import TrainConfig, fit

    root = tmp_path_factory.mktemp("mosaics")
    csv_path = write_mosaics(root / "data", 320)
    torch.set_num_threads(1)
    cfg = TrainConfig(
        data=csv_path,
        task="multilabel",
        threshold=0.4,
        val_split=0.25,
        out=str(root / "run"),
        model="vit_cifar_patch4_32",
        model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
        epochs=12,
        lr=3e-3,
        warmup_epochs=1,
        batch_size=16,
        cache_dir=str(root / "cache"),
        progress=False,
        threads=1,
    )
    return fit(cfg), root


def test_a_tiny_multilabel_run_learns_the_colour_patches(trained):
    res, _ = trained
    val = res.val_raw
    # chance: each colour is in 1 - (1 - 1/12)**4 = 29 % of the images, a random ranking's AP
    assert val["map"] > 0.8, val
    assert val["f1"] > 0.6 and val["threshold"] == 0.4
    assert res.val_top1 is None  # no accuracy for multi-label


def test_the_checkpoint_predicts_with_its_threshold_from_the_file_alone(trained, tmp_path):
    from vitkit import from_pretrained
    from vitkit.infer.evaluate import evaluate_model
    from vitkit.infer.predict import Predictor

    res, root = trained
    model = from_pretrained(res.model_path)
    assert model.task == {"name": "multilabel", "threshold": 0.4}
    assert task_of(model) == MultilabelTask(threshold=0.4)
    rng = np.random.default_rng(99)
    img, labels = mosaic(rng)
    while len(labels) < 2:
        img, labels = mosaic(rng)
    path = write_png(tmp_path / "q.png", img)
    pred = Predictor(res.model_path, precision="fp32").predict_one(path)
    assert pred.threshold == 0.4 and sorted(pred.labels) == labels
    assert all(p > 0.4 for p in pred.probs)
    strict = Predictor(res.model_path, precision="fp32", threshold=0.999).predict_one(path)
    assert set(strict.labels) <= set(pred.labels) and strict.threshold == 0.999
    ds = task_of(model).read(str(root / "data"), classes=model.labels, cache_dir=root / "cache", progress=False)
    report = evaluate_model(model, ds).to_dict()
    assert report["task"] == "multilabel" and report["map"] > 0.8
    assert set(report["per_class_ap"]) == set(COLOURS)


def test_cli_predict_threshold_and_evaluate_json(trained, tmp_path):
    res, root = trained
    path = write_png(tmp_path / "q.png", mosaic(np.random.default_rng(5))[0])
    out = run_vitkit(["predict", str(res.model_path), path, "--json", "--threshold", "0.6"])
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.splitlines()[-1])
    assert row["threshold"] == 0.6 and all(lab["prob"] > 0.6 for lab in row["labels"])
    out = run_vitkit(["evaluate", str(res.model_path), "--data", str(root / "data"), "--json"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["map"] > 0.8 and set(report["per_class_f1"]) == set(COLOURS)


def test_serve_returns_every_label_above_the_threshold(trained):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tests.conftest import png_bytes
    from vitkit.infer.predict import Predictor
    from vitkit.serve import create_app

    res, _ = trained
    img, labels = mosaic(np.random.default_rng(7))
    with TestClient(create_app(Predictor(res.model_path, precision="fp32"))) as client:
        body = client.post("/predict", files={"file": ("q.png", png_bytes(img), "image/png")}).json()
        assert body["threshold"] == 0.4 and sorted(lab["label"] for lab in body["labels"]) == labels
        assert len(body["top"]) == 5  # the page's bars: the most probable labels, above the threshold or not
        none = client.post("/predict?threshold=0.9999", files={"file": ("q.png", png_bytes(img), "image/png")})
        assert none.json()["threshold"] == 0.9999


def test_a_classifier_refuses_a_threshold(tmp_path):
    from vitkit.infer.predict import Predictor

    path = tiny_model(labels=list("abcde")).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="threshold applies to multi-label models"):
        Predictor(path, threshold=0.5)


def test_an_exported_onnx_file_keeps_the_task(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitkit import from_pretrained
    from vitkit.infer.export import export_onnx
    from vitkit.infer.predict import Predictor

    res, _ = trained
    onnx_path = export_onnx(from_pretrained(res.model_path), tmp_path / "m.onnx").path
    path = write_png(tmp_path / "q.png", mosaic(np.random.default_rng(3))[0])
    from_onnx = Predictor(onnx_path, backend="onnxruntime").predict_one(path)
    from_torch = Predictor(res.model_path, precision="fp32").predict_one(path)
    assert from_onnx.threshold == 0.4 and from_onnx.labels == from_torch.labels


def test_a_resumed_multilabel_run_with_ema_saves_a_multilabel_model(trained, tmp_path):
    from vitkit import from_pretrained
    from vitkit.train import TrainConfig, fit

    _, root = trained
    cfg = dict(
        data=str(root / "data"),
        task="multilabel",
        threshold=0.3,
        out=str(tmp_path / "run"),
        model="vit_cifar_patch4_32",
        model_kwargs=dict(patch_size=8, embed_dim=16, depth=1, num_heads=2),
        epochs=1,
        batch_size=16,
        ema_decay=0.9,
        cache_dir=str(root / "cache"),
        progress=False,
        threads=1,
    )
    fit(TrainConfig(**cfg, stop_after_steps=3))
    res = fit(TrainConfig(**cfg))  # resumes from the checkpoint
    assert from_pretrained(res.model_path).task == {"name": "multilabel", "threshold": 0.3}
    assert set(res.val_summary) == {"map", "f1"}
