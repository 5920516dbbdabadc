"""Segmentation at inference: masks at each picture's size, `vitkit predict`'s mask and overlay PNGs, `POST /segment`,
and ONNX export with the same parity as a classifier's."""

import io
import json
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import main as cli
from vitkit.infer.predict import Predictor
from vitkit.infer.segment import PALETTE, Segmenter, overlay_image, region_edges
from vitkit.tasks import SegmentTask

from .conftest import noise_rgb, png_bytes, tiny_model, write_png
from .segmentation_data import SHAPE_CLASSES

TOL = 1e-4  # fp32 export parity, as tests/test_export.py


def seg_model(head: str = "linear"):
    model = tiny_model(img_size=32, patch_size=4, embed_dim=32, depth=4, num_classes=3, labels=SHAPE_CLASSES)
    SegmentTask(head=head).attach(model)
    with torch.no_grad():  # a decisive random decoder: every class shows up somewhere in a noise picture
        model.head.classify.weight.mul_(50)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return seg_model().save(tmp_path_factory.mktemp("seg") / "seg.safetensors")


def test_masks_come_at_each_pictures_own_size(ckpt):
    segmenter = Segmenter(Predictor(ckpt, precision="fp32"))
    results = segmenter.segment([noise_rgb(40, 56), noise_rgb(20, 24, seed=1)])
    (a, rgb_a), (b, _) = results
    assert a.mask.shape == (40, 56) and b.mask.shape == (20, 24) and a.mask.dtype == np.uint8
    assert rgb_a.shape == (40, 56, 3)
    assert set(np.unique(a.mask)) <= {0, 1, 2}
    assert sum(c["fraction"] for c in a.coverage()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="segmentation needs"):
        Segmenter(Predictor(tiny_model(labels=["a", "b", "c", "d", "e"])))


def test_overlay_blends_class_colours_and_outlines_regions():
    rgb = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[:, 2:] = 1
    out = overlay_image(rgb, mask, alpha=0.5)
    edges = region_edges(mask)
    assert edges[:, 1].all() and edges.sum() == 4  # the column left of the class border
    assert (out[edges] == 255).all()
    assert np.array_equal(out[0, 0], ((100 + PALETTE[0].astype(int)) / 2 + 0.5).astype(np.uint8))
    assert np.array_equal(out[0, 3], ((100 + PALETTE[1].astype(int)) / 2 + 0.5).astype(np.uint8))


def test_predict_writes_mask_and_overlay_pngs(ckpt, tmp_path, capsys):
    image = write_png(tmp_path / "street.png", noise_rgb(40, 56))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out_dir = tmp_path / "out"
    rc = cli(["predict", str(ckpt), image, str(bad), "--json", "--out-dir", str(out_dir), "--precision", "fp32"])
    out, err = capsys.readouterr()
    assert rc == 1 and "bad.png" in err
    first, second = (json.loads(line) for line in out.strip().splitlines())
    assert "not an image" in second["error"]
    assert first["mask_png"] == str(out_dir / "street.mask.png")
    mask_file = Image.open(out_dir / "street.mask.png")
    assert mask_file.mode == "P" and mask_file.size == (56, 40)
    mask = np.asarray(mask_file)
    expected = Segmenter(Predictor(ckpt, precision="fp32")).segment([noise_rgb(40, 56)])[0][0].mask
    assert np.array_equal(mask, expected)  # the file holds the class indices themselves
    assert np.array_equal(np.asarray(mask_file.convert("RGB")), PALETTE[mask])  # and its palette colours them
    overlay = np.asarray(Image.open(out_dir / "street.overlay.png"))
    assert overlay.shape == (40, 56, 3)
    assert np.array_equal(overlay, overlay_image(noise_rgb(40, 56), mask))
    labels = {c["label"] for c in first["classes"]}
    assert labels <= set(SHAPE_CLASSES) and labels


def test_segment_endpoint_answers_png_overlay_and_json(ckpt):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
    from fastapi.testclient import TestClient

    from vitkit.serve import create_app

    picture = noise_rgb(40, 56)
    want = Segmenter(Predictor(ckpt)).segment([picture])[0][0]
    with TestClient(create_app(Predictor(ckpt))) as client:
        files = {"file": ("x.png", png_bytes(picture), "image/png")}
        r = client.post("/segment", files=files)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want.mask)
        classes = json.loads(unquote(r.headers["x-vitkit-classes"]))
        assert classes == want.coverage()
        r = client.post("/segment?format=overlay", files=files)
        assert Image.open(io.BytesIO(r.content)).mode == "RGB"
        r = client.post("/segment?format=json", files=files)
        body = r.json()
        assert (body["height"], body["width"]) == (40, 56) and np.array_equal(np.array(body["mask"]), want.mask)
        r = client.post("/segment", files={"file": ("n.txt", b"hello there", "text/plain")})
        assert r.status_code == 415 and "not an image" in r.json()["detail"]
        assert client.post("/segment?format=gif", files=files).status_code == 422
        big = {"file": ("big.png", png_bytes(np.zeros((2100, 2000, 3), np.uint8)), "image/png")}
        r = client.post("/segment?format=json", files=big)  # 4.2 MP: too large a mask for JSON, fine as a PNG
        assert r.status_code == 413 and "format=png" in r.json()["detail"]
        health = client.get("/healthz").json()
        assert health["model"]["task"]["name"] == "segment"


def test_segment_endpoint_refuses_a_classifier(tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
    from fastapi.testclient import TestClient

    from vitkit.serve import create_app

    classifier = tiny_model(labels=["a", "b", "c", "d", "e"])
    with TestClient(create_app(Predictor(classifier))) as client:
        r = client.post("/segment", files={"file": ("x.png", png_bytes(noise_rgb()), "image/png")})
    assert r.status_code == 422 and "'classify' model" in r.json()["detail"]


@pytest.mark.parametrize("head", ["linear", "pyramid"])
def test_onnx_export_matches_pytorch_at_two_sizes(tmp_path, head):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vitkit.infer.export import export_onnx, exportable_copy
    from vitkit.infer.onnx_backend import OnnxModel

    model = seg_model(head)
    result = export_onnx(model, tmp_path / "seg.onnx", dynamic=True)
    assert result.max_abs_diff is not None and result.max_abs_diff < TOL
    runner = OnnxModel(result.path)
    assert runner.task == model.task
    reference = exportable_copy(model, dynamic=True)
    for size in [(32, 32), (24, 40)]:
        x = torch.randn(2, 3, *size)
        with torch.inference_mode():
            expected = reference(x)
        got = runner(x)
        assert got.shape == expected.shape == (2, 3, *size)
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    masks = Segmenter(Predictor(result.path, backend="onnxruntime")).segment([noise_rgb(40, 56)])
    assert masks[0][0].mask.shape == (40, 56)


def test_evaluate_json_gives_miou_pixel_accuracy_and_per_class_iou(ckpt, tmp_path, capsys):
    from vitkit.data.seg_transforms import SegEvalTransform
    from vitkit.data.segmentation import load_segmentation_source
    from vitkit.model.loading import load_model
    from vitkit.tasks.segment import SegmentationMetrics

    from .segmentation_data import write_segmentation_folder

    root = write_segmentation_folder(tmp_path / "seg", n=6, size=40)  # scored at 40 px, the model runs at 32
    args = ["evaluate", str(ckpt), "--data", str(root), "--json", "--cache-dir", str(tmp_path / "cache")]
    assert cli([*args, "--precision", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["task"] == "segment" and report["n"] == 6 and report["pixels"] == 6 * 40 * 40
    assert set(report["per_class_iou"]) == set(SHAPE_CLASSES)
    model = load_model(ckpt)
    ds = load_segmentation_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    images, masks = torch.from_numpy(np.array(ds.images)).permute(0, 3, 1, 2), torch.from_numpy(np.array(ds.masks))
    x, y = SegEvalTransform(model.preprocess)(images, masks)
    by_hand = SegmentationMetrics(3)
    with torch.no_grad():
        by_hand.update(model(x), y)
    want = by_hand.result()
    assert report["miou"] == pytest.approx(want["miou"]) and report["pixel_acc"] == pytest.approx(want["pixel_acc"])


def test_flip_tta_mirrors_a_class_map_back():
    from vitkit.infer.evaluate import evaluate_batches
    from vitkit.tasks.segment import SegmentationMetrics

    model = seg_model()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    with torch.no_grad():
        averaged = (model(x) + model(x.flip(-1)).flip(-1)) / 2
    want = SegmentationMetrics(3)
    want.update(averaged, y)
    got = evaluate_batches(model, [(x, y)], 3, precision="fp32", tta=True, task=SegmentTask())
    assert got["loss"] == pytest.approx(want.result()["loss"], rel=1e-5)


def test_a_fresh_process_loads_a_segmentation_file_by_name_alone(ckpt, tmp_path):
    """`vitkit.from_pretrained` (and every verb built on it, `export` among them) rebuilds the decoder without the
    caller importing vitkit.tasks; a plain classifier still loads without the task stack."""
    from .conftest import run_python

    classifier = tiny_model(labels=["a", "b", "c", "d", "e"]).save(tmp_path / "cls.safetensors")
    code = (
        "import sys, vitkit\n"
        f"c = vitkit.from_pretrained({str(classifier)!r})\n"
        "print('tasks after a classifier:', 'vitkit.tasks' in sys.modules)\n"
        f"m = vitkit.from_pretrained({str(ckpt)!r})\n"
        "print(type(m).__name__, m.task['head'])\n"
    )
    r = run_python(["-c", code])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tasks after a classifier: False" in r.stdout and "SegmentationViT linear" in r.stdout
