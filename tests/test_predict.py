"""Predictor and `vitkit predict`: checkpoint preprocessing, bf16 vs fp32, batching, per-image errors, backends."""

import json

import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.data.decode import ImageDecodeError
from vitkit.data.preprocess import preprocess_image
from vitkit.infer.predict import Failure, Prediction, Predictor, register_backend, trim_extreme_aspect

from .conftest import noise_rgb, tiny_kwargs, tiny_model, write_png

LABELS = ["cat", "dog", "car", "ship", "frog"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_model("vit_small_patch16_224", labels=LABELS)
    # an unusual preprocessing spec: predictions must use it, not a default
    model.preprocess = vitkit.PreprocessConfig((32, 32), (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), "bilinear", 0.875)
    return model.save(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_prediction_uses_checkpoint_preprocessing_and_labels(ckpt):
    p = Predictor(ckpt, precision="fp32")
    rgb = noise_rgb()
    pred = p.predict_one(rgb, topk=3)
    x = preprocess_image(rgb, p.model.preprocess, 3)[None]  # the stored spec, applied by hand
    with torch.no_grad():
        ref = p.model(x).softmax(-1)[0]
    top = ref.topk(3)
    assert pred.indices == top.indices.tolist()
    assert pred.labels == [LABELS[i] for i in top.indices.tolist()]
    assert np.allclose(pred.probs, top.values.tolist(), atol=1e-5)
    assert pred.probs == sorted(pred.probs, reverse=True)


def test_bf16_fast_path_agrees_with_fp32(ckpt):
    images = [noise_rgb(seed=s) for s in range(6)]
    fast, exact = Predictor(ckpt), Predictor(ckpt, precision="fp32")
    batch = torch.stack([fast.prepare(im) for im in images])
    lf, le = fast.logits(batch), exact.logits(batch)
    assert lf.dtype == torch.float32
    assert (lf - le).abs().max() < 0.05 * le.abs().max() + 0.02  # bf16 keeps ~3 significant digits
    assert torch.allclose(lf.softmax(-1), le.softmax(-1), atol=0.01)


def test_bf16_predictor_runs_the_cpu_fast_path_by_default(ckpt):
    from vitkit.fast import packing as fast_inference

    p = Predictor(ckpt)
    p.predict_one(noise_rgb())
    packed = fast_inference.packed_layers(p.model)
    assert p.describe()["cpu_fast_path"] == fast_inference.available()
    assert bool(packed) == fast_inference.available()  # every linear layer, when the kernels exist
    exact = Predictor(ckpt, precision="fp32")
    exact.predict_one(noise_rgb())
    assert not fast_inference.packed_layers(exact.model)


def test_batched_equals_one_by_one(ckpt):
    p = Predictor(ckpt, precision="fp32")
    images = [noise_rgb(seed=s) for s in range(5)]
    batched = p.predict(images, topk=5, batch_size=3)
    single = [p.predict_one(im, topk=5) for im in images]
    for b, s in zip(batched, single):
        assert b.indices == s.indices
        assert np.allclose(b.probs, s.probs, atol=1e-5)
        assert sum(b.probs) == pytest.approx(1.0, abs=1e-4)


def test_bad_images_are_collected_or_raised(ckpt, tmp_path):
    p = Predictor(ckpt)
    good = write_png(tmp_path / "good.png", noise_rgb())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = p.predict([good, str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png")], errors="collect")
    assert isinstance(out[0], Prediction)
    assert isinstance(out[1], Failure) and "broken.jpg" in out[1].error
    assert isinstance(out[2], Failure) and "missing.png" in out[2].error and "does not exist" in out[2].error
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        p.predict([good, str(tmp_path / "broken.jpg")])


def test_extreme_aspect_images_are_trimmed_not_blown_up(ckpt):
    p = Predictor(ckpt)
    line = noise_rgb(2, 200_000)  # resized naively this would become 32 x 3,657,142 before the crop
    assert trim_extreme_aspect(line, p.preprocess).shape[1] < 100
    assert p.prepare(line).shape == (3, 32, 32)
    ordinary = noise_rgb(30, 90)
    assert trim_extreme_aspect(ordinary, p.preprocess) is ordinary


def test_input_size_only_for_dynamic_models(ckpt, tmp_path):
    with pytest.raises(ValueError, match="dynamic_img_size"):
        Predictor(ckpt, input_size=(48, 32))
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs(dynamic_img_size=True))
    p = Predictor(model, input_size=(48, 32))
    assert p.prepare(noise_rgb()).shape == (3, 48, 32)
    assert len(p.predict_one(noise_rgb(), topk=2).labels) == 2


def test_pluggable_backend(ckpt):
    calls = []

    def constant_backend(model, checkpoint=None, favourite=0):
        def run(batch):
            calls.append(tuple(batch.shape))
            logits = torch.zeros(batch.shape[0], model.cfg.num_classes)
            logits[:, favourite] = 10.0
            return logits

        return run

    register_backend("constant-test", constant_backend)
    p = Predictor(ckpt, backend="constant-test", favourite=3)
    pred = p.predict([noise_rgb(), noise_rgb(seed=1)], topk=1)
    assert [r.labels for r in pred] == [["ship"], ["ship"]]
    assert calls == [(2, 3, 32, 32)]
    with pytest.raises(ValueError, match="unknown backend 'nope'.*torch"):
        Predictor(ckpt, backend="nope")


def test_cli_json_and_bad_file_named(ckpt, tmp_path, capsys):
    good = write_png(tmp_path / "good.png", noise_rgb())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"hello")
    rc = main(["predict", str(ckpt), good, str(bad), "--json", "--topk", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert lines[0]["image"] == good and len(lines[0]["top"]) == 2
    assert {"label", "index", "prob"} <= set(lines[0]["top"][0])
    assert lines[1]["image"] == str(bad) and "not an image" in lines[1]["error"]
    assert "bad.png" in err and "1 of 2 image(s) failed" in err

    rc = main(["predict", str(ckpt), good, "--topk", "3"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert out.startswith(f"{good}: ") and out.count("%") == 3


def test_compiled_backend_agrees_with_the_eager_one_across_batch_sizes(ckpt, tmp_path, capsys):
    """`--backend torch-compile`: torch.compile with frozen weights; same top-1 and close probabilities as the
    eager backend for a batch of 3 and then 1 (a specialised shape: a second compile)."""
    images = [write_png(tmp_path / f"{i}.png", noise_rgb(seed=i)) for i in range(3)]
    eager = Predictor(ckpt).predict(images, topk=5)
    compiled = Predictor(ckpt, backend="torch-compile")
    for batch in (3, 1):
        got = compiled.predict(images, topk=5, batch_size=batch)
        for e, c in zip(eager, got):
            assert e.labels[0] == c.labels[0]
            assert np.allclose(e.probs, c.probs, atol=0.02)
    assert main(["predict", str(ckpt), images[0], "--backend", "torch-compile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["top"][0]["label"] == eager[0].labels[0]
