"""Attention maps, rollout and `vitkit explain`: distributions stay distributions, registers and avg-pool models
are handled, any input size works, and only the needed layers take the explicit attention path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.infer.attention_maps import (
    attention_rollout,
    cls_attention,
    discard_lowest,
    patch_attention,
    rollout_map,
)
from vitkit.infer.explain import Explainer, figure_png, overlay_png
from vitkit.infer.predict import Predictor

from .conftest import noise_rgb, tiny_kwargs


def random_attention(B=2, H=3, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, N, generator=g).mul(3).softmax(-1)  # (B, H, N, N), rows sum to 1


def test_rollout_rows_stay_stochastic_with_and_without_discard():
    maps = [random_attention(seed=s) for s in range(4)]
    for discard in (0.0, 0.5, 0.9):
        for head in ("mean", "max", "min", 1):
            r = attention_rollout(maps, head=head, discard_ratio=discard)
            assert r.shape == (2, 7, 7)
            assert (r >= 0).all()
            assert torch.allclose(r.sum(-1), torch.ones(2, 7), atol=1e-5)


def test_rollout_matches_the_formula_for_two_layers():
    a1, a2 = random_attention(seed=1), random_attention(seed=2)
    eye = torch.eye(7)

    def step(a):
        m = 0.5 * a.mean(1) + 0.5 * eye
        return m / m.sum(-1, keepdim=True)

    assert torch.allclose(attention_rollout([a1, a2]), step(a2) @ step(a1), atol=1e-6)


def test_discard_keeps_shape_and_the_cls_column():
    a = random_attention(B=2, H=1, N=6)[:, 0]  # (B, N, N)
    d = discard_lowest(a, 0.9)
    assert d.shape == a.shape
    assert torch.equal(d[:, :, 0], a[:, :, 0])  # the class token's column is never discarded
    rest_before, rest_after = a[:, :, 1:].flatten(1), d[:, :, 1:].flatten(1)  # (B, 30) non-cls entries
    dropped = rest_after == 0
    assert dropped.sum(-1).tolist() == [int(30 * 0.9)] * 2
    for i in range(2):  # the largest survive
        assert rest_before[i][~dropped[i]].min() >= rest_before[i][dropped[i]].max()
    with pytest.raises(ValueError, match="discard"):
        attention_rollout([random_attention()], discard_ratio=1.0)


def test_register_tokens_are_left_out_of_the_map():
    P, grid = 3, (2, 2)  # cls + 2 registers, 4 patches: N = 7
    a = random_attention(B=1, H=2, N=7)
    heat = cls_attention(a, P, grid)
    assert heat.shape == (1, 2, 2)
    assert torch.allclose(heat.sum(dim=(-2, -1)), torch.ones(1), atol=1e-6)
    # moving attention between the cls token and the registers does not change the map
    b = a.clone()
    b[:, :, 0, 1:3] = b[:, :, 0, 1:3] * 5
    b = b / b.sum(-1, keepdim=True)
    assert torch.allclose(cls_attention(b, P, grid), heat, atol=1e-6)
    # and the map is exactly the cls row over the patch columns, renormalised
    row = a[0, :, 0, 3:] / a[0, :, 0, 3:].sum(-1, keepdim=True)
    assert torch.allclose(heat[0].flatten(), row.mean(0), atol=1e-6)


def test_patch_attention_and_rollout_map_without_cls():
    a = random_attention(B=2, H=4, N=6)  # no prefix: 6 patches in a 2x3 grid
    heat = patch_attention(a, 0, (2, 3), head="all")
    assert heat.shape == (2, 4, 2, 3)
    assert torch.allclose(heat.sum(dim=(-2, -1)), torch.ones(2, 4), atol=1e-6)
    assert torch.allclose(heat[:, 0].flatten(1), a[:, 0].mean(1) / a[:, 0].mean(1).sum(-1, keepdim=True))
    m = rollout_map(attention_rollout([a, a]), 0, (2, 3), has_cls=False)
    assert m.shape == (2, 2, 3) and torch.allclose(m.sum(dim=(-2, -1)), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize(
    "kw,phrase",
    [
        (dict(reg_tokens=2), "2 register tokens left out"),
        (dict(global_pool="avg", class_token=False), "no class token (avg pooling)"),
        (dict(global_pool="map", class_token=False), "no class token (map pooling)"),
        (dict(), "class-token"),
    ],
)
@pytest.mark.parametrize("method", ["attention", "rollout"])
def test_explainer_on_model_kinds(kw, phrase, method):
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs(**kw))
    p = Predictor(model)
    e = Explainer(p, method=method, discard=0.5 if method == "rollout" else 0.0)
    assert phrase in e.description
    (ex,) = e.explain([noise_rgb()])
    assert ex.heat.shape == (4, 4)
    assert ex.heat.sum() == pytest.approx(1.0, abs=1e-4)
    assert ex.crop.shape == (32, 32, 3) and ex.crop.dtype == np.uint8
    assert Image.open(io.BytesIO(overlay_png(ex))).size == (320, 320)


def test_only_the_asked_layer_takes_the_explicit_path():
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs(depth=4))
    seen = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(
            lambda m, args, kwargs, out, i=i: seen.append((i, out[1] is not None)), with_kwargs=True
        )
    p = Predictor(model)
    Explainer(p, layer=2).maps(p.prepare(noise_rgb())[None])
    assert seen == [(0, False), (1, False), (2, True), (3, False)]
    seen.clear()
    Explainer(p, method="rollout", layer=-2).maps(p.prepare(noise_rgb())[None])
    assert seen == [(0, True), (1, True), (2, True), (3, False)]


def test_non_square_dynamic_input_and_head_grid():
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs(dynamic_img_size=True, reg_tokens=1))
    p = Predictor(model, input_size=(48, 24))
    e = Explainer(p, head="all")
    (ex,) = e.explain([noise_rgb(60, 30)])
    assert ex.crop.shape == (48, 24, 3)
    assert ex.heat.shape == (4, 6, 3)  # (heads, 48/8, 24/8)
    assert np.allclose(ex.heat.sum(axis=(1, 2)), 1.0, atol=1e-4)
    png = Image.open(io.BytesIO(overlay_png(ex)))
    assert png.size == (4 * 160, 320)  # one tile per head, longer side 320
    fig = Image.open(io.BytesIO(figure_png(ex)))
    assert fig.size[0] > fig.size[1]


def test_bad_options_are_clear():
    p = Predictor(vitkit.create_model("vit_small_patch16_224", **tiny_kwargs()))
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        Explainer(p, layer=5)
    with pytest.raises(ValueError, match="rollout fuses heads"):
        Explainer(p, method="rollout", head="all")
    with pytest.raises(ValueError, match="head 9 does not exist"):
        Explainer(p, head=9)
    with pytest.raises(ValueError, match="rollout only"):
        Explainer(p, discard=0.5)


def test_cli_explain_writes_pngs_and_names_bad_files(tmp_path, capsys):
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs(reg_tokens=2))
    model.labels = ["cat", "dog", "car", "ship", "frog"]
    ckpt = model.save(tmp_path / "m.safetensors")
    good = tmp_path / "photo.png"
    Image.fromarray(noise_rgb()).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "one.png"
    assert main(["explain", str(ckpt), str(good), "--method", "rollout", "--discard", "0.9", "-o", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    assert "register tokens left out" in capsys.readouterr().out
    rc = main(["explain", str(ckpt), str(good), str(bad), "--head", "all", "-o", str(tmp_path / "maps")])
    o, err = capsys.readouterr()
    assert rc == 1
    assert (tmp_path / "maps" / "photo_attention.png").is_file()
    assert "broken.jpg" in err and "predicted" in o


def test_grayscale_model_shows_the_luminance_it_sees():
    model = vitkit.create_model("vit_small_patch16_224", **tiny_kwargs(in_chans=1))
    (ex,) = Explainer(Predictor(model)).explain([noise_rgb()])
    assert ex.crop.shape == (32, 32, 3)
    assert (ex.crop[..., 0] == ex.crop[..., 1]).all() and (ex.crop[..., 1] == ex.crop[..., 2]).all()
    assert ex.heat.shape == (4, 4)
