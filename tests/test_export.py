"""ONNX and torch.export: the exported graph matches PyTorch at any batch and image size (fp32, within 1e-4),
carries its metadata, and runs behind `Predictor(..., backend="onnxruntime")` and `vitkit predict`."""

import json

import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli import main as cli
from vitkit.infer.export import DEFAULT_OPSET, export_onnx, export_pt2
from vitkit.infer.onnx_backend import OnnxModel
from vitkit.infer.predict import Predictor

from .conftest import tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4  # fp32: the graph runs the same arithmetic in another order (fused LayerNorm/Gelu, Gemm)


def rough_model() -> vitkit.VisionTransformer:
    """Tiny ViT with a cls and a register token and a *rough* position embedding, so that resampling it to another
    grid changes the logits a lot (a graph that skipped or botched the resampling would fail the parity test)."""
    model = tiny_model("S/16", reg_tokens=1, labels=["cat", "dog", "emu", "fox", "gnu"])
    torch.nn.init.normal_(model.pos_embed, std=1.0)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = rough_model()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(model, path, dynamic=True)
    reference = vitkit.from_pretrained(model.save(path.with_suffix(".safetensors")), dynamic_img_size=True).eval()
    return result, reference


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (24, 40)], ids=["native", "larger", "non-square-down"])
def test_onnxruntime_matches_pytorch_at_any_size(exported, size, batch):
    result, reference = exported
    x = torch.randn(batch, 3, *size)
    with torch.inference_mode():
        expected = reference(x)
    got = OnnxModel(result.path)(x)
    assert got.shape == expected.shape == (batch, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)


def test_resampling_happens_inside_the_graph(exported):
    """The same image at two sizes gives different logits in PyTorch; the graph must follow, not freeze one grid."""
    result, reference = exported
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        at_64 = reference(x)
        at_32 = reference(torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear"))
    assert (at_64 - at_32).abs().max() > 100 * TOL
    import onnx

    ops = {n.op_type: n for n in onnx.load(str(result.path)).graph.node}
    resize = {a.name: onnx.helper.get_attribute_value(a) for a in ops["Resize"].attribute}
    assert resize["antialias"] == 1 and resize["mode"] == b"cubic"


def test_onnx_metadata_makes_the_file_self_contained(exported):
    import onnx

    result, reference = exported
    proto = onnx.load(str(result.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert result.opset == DEFAULT_OPSET == opset == int(meta["vitkit.opset"])
    assert json.loads(meta["vitkit.labels"]) == reference.labels
    assert vitkit.PreprocessConfig.from_dict(json.loads(meta["vitkit.preprocess"])) == reference.preprocess
    assert json.loads(meta["vitkit.config"])["reg_tokens"] == 1
    assert result.max_abs_diff is not None and result.max_abs_diff < TOL
    shell = OnnxModel(result.path).shell()
    assert shell.cfg == reference.cfg and shell.labels == reference.labels


def test_static_export_refuses_other_sizes_and_old_opsets(tmp_path):
    model = rough_model()
    result = export_onnx(model, tmp_path / "static.onnx", dynamic=False)
    runner = OnnxModel(result.path)
    x = torch.randn(2, 3, 32, 32)  # batch 2 runs as two batch-1 calls
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), model(x), rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="fixed input"):
        runner(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="opset 17 is too old"):
        export_onnx(model, tmp_path / "old.onnx", opset=17)


def test_torch_export_pt2_runs_at_two_sizes(tmp_path):
    model = rough_model()
    result = export_pt2(model, tmp_path / "model.pt2", dynamic=True)
    program = torch.export.load(str(result.path)).module()
    dynamic = vitkit.from_pretrained(model.save(tmp_path / "m.safetensors"), dynamic_img_size=True).eval()
    for shape in [(2, 3, 32, 32), (1, 3, 48, 24)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(program(x), dynamic(x), rtol=0, atol=TOL)


def test_cli_export_then_predict_with_onnxruntime(tmp_path, capsys):
    from PIL import Image

    model = rough_model()
    ckpt = model.save(tmp_path / "model.safetensors")
    images = []
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 50), (32, 32)]):
        images.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images[-1])

    assert cli(["export", str(ckpt), "--dynamic", "--no-check", "-o", str(tmp_path / "m.onnx")]) == 0
    assert f"ONNX opset {DEFAULT_OPSET}" in capsys.readouterr().out

    assert cli(["predict", str(tmp_path / "m.onnx"), *images, "--backend", "onnxruntime", "--json"]) == 0
    onnx_out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    torch_out = [p.to_dict() for p in Predictor(ckpt, precision="fp32").predict(images)]
    for a, b in zip(onnx_out, torch_out):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-5)

    with pytest.raises(ValueError, match="--backend onnxruntime"):
        Predictor(tmp_path / "m.onnx")
