"""Gradient-weighted rollout (`explain --method grad-rollout --class`): equal to Chefer et al.'s formula computed by
hand on a tiny model, different maps for classes whose evidence lies in different places, and the CLI and server
paths with a class by name or index."""

import dataclasses
import io
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import main
from vitkit.infer.attention_maps import attention_gradients
from vitkit.infer.explain import Explainer, parse_class
from vitkit.infer.predict import Predictor

from .conftest import noise_rgb, png_bytes, tiny_model, write_png

LABELS = ["red", "blue", "other"]
RED, BLUE = (220, 30, 30), (30, 30, 220)


def hand_forward(model, x):
    """The model's forward written out block by block, each attention map kept with retain_grad: (logits, maps)."""
    captured = {}
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    model(x, return_attention="all")  # only to capture the tokens entering block 0 (every block as a module)
    handle.remove()
    tokens, maps = captured["x"].detach(), []
    for blk in model.blocks:
        B, N, D = tokens.shape
        q, k, v = blk.attn.split_heads(blk.attn.qkv(blk.norm1(tokens)))  # (B, heads, N, hd)
        a = (q @ k.transpose(-2, -1) * blk.attn.scale).softmax(dim=-1)  # (B, heads, N, N)
        a.retain_grad()
        maps.append(a)
        tokens = tokens + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        tokens = tokens + blk.mlp(blk.norm2(tokens))
    return model.forward_head(model.norm(tokens)), maps


def test_grad_rollout_equals_the_formula_by_hand():
    model = tiny_model("vit_small_patch16_224", depth=3, labels=["a", "b", "c", "d", "e"]).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, maps = hand_forward(model, x)
    assert torch.allclose(logits, model(x), atol=1e-5)  # the hand forward is the model's
    logits[:, 3].sum().backward()
    relevance = torch.eye(17).repeat(2, 1, 1)  # 1 cls + 16 patches
    for a in maps:  # Chefer et al. 2021: R <- R + mean_h(max(grad * A, 0)) R
        relevance = relevance + (a.grad * a).clamp(min=0).mean(dim=1) @ relevance
    want = relevance[:, 0, 1:] / relevance[:, 0, 1:].sum(dim=1, keepdim=True)
    model.zero_grad(set_to_none=True)
    got_logits, heat = Explainer(Predictor(model), "grad-rollout", target=3).maps(x)
    assert heat.shape == (2, 4, 4)
    assert torch.allclose(heat.flatten(1), want.detach(), atol=1e-5)
    assert torch.allclose(got_logits, logits.detach(), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the maps' gradients never reach the weights


def test_attention_maps_are_in_the_autograd_graph_only_with_grad():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 32, 32)
    logits, attn = model(x, return_attention="all")
    grads = attention_gradients(logits[0, 1], list(attn.values()))
    assert [g.shape for g in grads] == [a.shape for a in attn.values()] and grads[-1].abs().sum() > 0
    with torch.no_grad():
        logits, attn = model(x, return_attention="all")
    with pytest.raises(RuntimeError, match="not part of an autograd graph"):
        attention_gradients(logits[0, 1], list(attn.values()))


def two_objects(red_at, blue_at, rng) -> np.ndarray:
    """A 32x32 grey-noise image with an 8x8 red square at patch `red_at` and a blue one at `blue_at` (None: absent)."""
    img = rng.integers(90, 160, (32, 32, 3)).astype(np.uint8)
    for colour, at in ((RED, red_at), (BLUE, blue_at)):
        if at is not None:
            img[at[0] * 8 : at[0] * 8 + 8, at[1] * 8 : at[1] * 8 + 8] = colour
    return img


def train_colour_model(seed: int = 0, steps: int = 80):
    """A tiny ViT trained for a few seconds to tell a red square (class 0) from a blue one (class 1), anywhere."""
    torch.manual_seed(seed)
    model = tiny_model("vit_small_patch16_224", seed=seed, labels=LABELS, num_classes=3)
    model.preprocess = dataclasses.replace(model.preprocess, crop_pct=1.0)  # the input is the image: no crop
    mean, std = torch.tensor(model.preprocess.mean).view(3, 1, 1), torch.tensor(model.preprocess.std).view(3, 1, 1)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    cells = [(i, j) for i in range(4) for j in range(4)]
    model.train()
    for _ in range(steps):
        y = rng.integers(0, 2, 32)
        where = [cells[i] for i in rng.integers(0, 16, 32)]
        imgs = np.stack([two_objects(w if c == 0 else None, w if c == 1 else None, rng) for c, w in zip(y, where)])
        x = (torch.from_numpy(imgs).permute(0, 3, 1, 2) / 255.0 - mean) / std  # what Predictor.prepare gives here
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's steps run faster, and steadier beside other jobs, on one thread
    try:
        model = train_colour_model()
    finally:
        torch.set_num_threads(threads)
    return Predictor(model.save(tmp_path_factory.mktemp("colour") / "colour.safetensors"))


def test_the_map_follows_the_class_asked_about(colour_model):
    rng = np.random.default_rng(1)
    for red_at, blue_at in [((0, 0), (3, 3)), ((3, 1), (0, 2)), ((1, 3), (2, 0))]:
        image = two_objects(red_at, blue_at, rng)
        peaks = []
        for target in (0, 1):
            (ex,) = Explainer(colour_model, "grad-rollout", target=target).explain([image])
            peaks.append(tuple(int(v) for v in np.unravel_index(ex.heat.argmax(), ex.heat.shape)))
        assert peaks == [red_at, blue_at]  # two classes, two maps: each peaks on its own class's square
    with pytest.raises(ValueError, match="grad-rollout only"):
        Explainer(colour_model, "rollout").maps(torch.zeros(1, 3, 32, 32), targets=torch.tensor([1]))


def test_class_by_name_or_index_and_clear_errors(colour_model):
    assert parse_class("blue", LABELS) == 1 and parse_class("2", LABELS) == 2 and parse_class(None, LABELS) is None
    assert parse_class("1", ["1", "0"]) == 0  # a class name wins over an index
    with pytest.raises(ValueError, match="neither a class"):
        parse_class("green", LABELS)
    with pytest.raises(ValueError, match="class 7 does not exist"):
        parse_class("7", LABELS)
    with pytest.raises(ValueError, match="grad-rollout only"):
        Explainer(colour_model, "rollout", target=1)
    with pytest.raises(ValueError, match="fuses heads"):
        Explainer(colour_model, "grad-rollout", head="all")
    e = Explainer(colour_model, "grad-rollout", target=1, layer=0)
    assert "class 'blue'" in e.description and "layers 0-0" in e.description


def test_cli_grad_rollout(colour_model, tmp_path, capsys):
    image = write_png(tmp_path / "two.png", two_objects((0, 0), (3, 3), np.random.default_rng(2)))
    ckpt = str(colour_model.checkpoint)
    out = tmp_path / "map.png"
    assert main(["explain", ckpt, image, "--method", "grad-rollout", "--class", "blue", "-o", str(out)]) == 0
    assert Image.open(out).format == "PNG" and "class 'blue'" in capsys.readouterr().out
    assert main(["explain", ckpt, image, "--method", "attention", "--class", "0"]) == 1
    assert "grad-rollout only" in capsys.readouterr().err
    assert main(["explain", ckpt, image, "--method", "grad-rollout", "--class", "green"]) == 1
    assert "neither a class" in capsys.readouterr().err


def test_server_grad_rollout(colour_model):
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'vitkit[serve]'")
    from fastapi.testclient import TestClient

    from vitkit.serve import create_app

    body = png_bytes(two_objects((0, 0), (3, 3), np.random.default_rng(3)))
    with TestClient(create_app(colour_model)) as client:
        maps = []
        for target in ("red", "1"):
            r = client.post(
                "/explain", params={"method": "grad-rollout", "class": target}, files={"file": ("a.png", body)}
            )
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            assert f"class '{LABELS[parse_class(target, LABELS)]}'" in unquote(r.headers["X-Vitkit-Map"])
            maps.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))
        assert not np.array_equal(maps[0], maps[1])  # two classes, two overlays
        r = client.post(
            "/explain", params={"method": "grad-rollout", "class": "green"}, files={"file": ("a.png", body)}
        )
        assert r.status_code == 422 and "neither a class" in r.text
        r = client.post("/explain", params={"method": "rollout", "class": "red"}, files={"file": ("a.png", body)})
        assert r.status_code == 422 and "grad-rollout only" in r.text
        assert client.post("/explain", files={"file": ("n.png", png_bytes(noise_rgb()))}).status_code == 200
