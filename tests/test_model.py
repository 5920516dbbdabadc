"""Core model: every sensible option combination, shapes, attention maps, backends, intermediates."""

import itertools

import pytest
import torch

import vitkit
from vitkit.model.layers import Attention

from .conftest import tiny_kwargs

OPTION_GRID = list(
    itertools.product(
        [(True, "token"), (True, "avg"), (False, "avg"), (False, "map"), (True, "map")],  # class_token, global_pool
        [0, 2],  # reg_tokens
        ["learn", "sincos2d", "none"],  # pos_embed
        [False, True],  # no_embed_class
        [False, True],  # qk_norm + LayerScale
    )
)


@pytest.mark.parametrize("pool,regs,pos,no_embed_class,extras", OPTION_GRID)
def test_option_combinations_forward_backward(pool, regs, pos, no_embed_class, extras):
    class_token, global_pool = pool
    model = vitkit.create_model(
        "vit_tiny_patch16_224",
        **tiny_kwargs(
            class_token=class_token, global_pool=global_pool, reg_tokens=regs, pos_embed=pos,
            no_embed_class=no_embed_class, qk_norm=extras, init_values=1e-4 if extras else None,
            drop_path_rate=0.1, drop_rate=0.1,
        ),
    )  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("img,patch", [((32, 48), 8), ((24, 40), (4, 8)), (28, 7)])
def test_non_square_images_and_patches(img, patch):
    model = vitkit.create_model("S/16", **tiny_kwargs(img_size=img, patch_size=patch))
    out = model.forward_intermediates(torch.randn(1, 3, *vitkit.config.to_2tuple(img)), indices=1)
    cfg = model.cfg
    assert out.layers[0].patches.shape == (1, 32, *cfg.grid_size)


def test_conv_stem_and_in_chans():
    model = vitkit.create_model("vit_cifar_patch4_32", stem="conv", in_chans=1, embed_dim=32, depth=1, num_heads=2)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="power-of-two"):
        vitkit.create_model("vit_tiny_patch14_224", stem="conv")


def test_conv_stem_layers_roundtrip(tmp_path):
    """stem_layers builds one conv per (width, stride), and the layout survives save -> from_pretrained."""
    layers = [(8, 2), (8, 1), (16, 2)]  # YAML / JSON give lists; the config keeps tuples
    model = vitkit.create_model(
        "vit_cifar_patch4_32", stem="conv", stem_layers=layers, embed_dim=32, depth=1, num_heads=2
    )
    convs = [m for m in model.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == layers
    assert model.cfg.stem_layers == ((8, 2), (8, 1), (16, 2))
    x = torch.randn(2, 3, 32, 32)
    assert model.patch_embed(x).shape == (2, 32, 8, 8)
    model.eval()
    model.save(tmp_path / "m.safetensors")
    back = vitkit.from_pretrained(tmp_path / "m.safetensors").eval()
    assert back.cfg.stem_layers == model.cfg.stem_layers
    torch.testing.assert_close(back(x), model(x))
    with pytest.raises(ValueError, match="multiply to the"):
        vitkit.create_model("vit_cifar_patch4_32", stem="conv", stem_layers=[(8, 2), (8, 1)])
    with pytest.raises(ValueError, match="needs stem='conv'"):
        vitkit.create_model("vit_cifar_patch4_32", stem_layers=[(8, 2), (8, 2)])


def test_wrong_input_size_is_a_clear_error():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("pos", ["learn", "sincos2d"])
def test_dynamic_img_size_gives_expected_grid(pos):
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(dynamic_img_size=True, pos_embed=pos))
    out = model.forward_intermediates(torch.randn(2, 3, 48, 24), indices=[-1])
    assert out.layers[0].patches.shape == (2, 32, 6, 3)
    assert model(torch.randn(2, 3, 48, 24)).shape == (2, 5)
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("regs,ls", [(0, None), (3, 1e-5)])
def test_backends_agree_with_and_without_maps(regs, ls):
    kw = tiny_kwargs(reg_tokens=regs, init_values=ls, qk_norm=True)
    sdpa = vitkit.create_model("vit_tiny_patch16_224", attn_backend="sdpa", **kw).eval()
    math = vitkit.create_model("vit_tiny_patch16_224", attn_backend="math", **kw).eval()
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = sdpa(x), math(x)
        c, maps = sdpa(x, return_attention="all")
    assert (a - b).abs().max() <= 1e-5
    assert (a - c).abs().max() <= 1e-5
    # gradients agree too (training uses both backends)
    xs = x.clone().requires_grad_()
    xm = x.clone().requires_grad_()
    sdpa(xs).sum().backward()
    math(xm).sum().backward()
    assert (xs.grad - xm.grad).abs().max() <= 1e-5


def test_attention_maps_are_distributions_and_only_asked_layers_compute_them():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=4, reg_tokens=1)).eval()
    calls = []
    for i, blk in enumerate(model.blocks):
        orig = blk.attn.forward

        def spy(x, need_weights=False, _i=i, _orig=orig, **kwargs):
            calls.append((_i, need_weights))
            return _orig(x, need_weights, **kwargs)

        blk.attn.forward = spy
    with torch.no_grad():
        logits, maps = model(torch.randn(2, 3, 32, 32), return_attention=[1, -1])
    assert sorted(maps) == [1, 3]
    assert calls == [(0, False), (1, True), (2, False), (3, True)]
    N = 1 + 1 + 16
    for a in maps.values():
        assert a.shape == (2, 4, N, N)
        assert (a >= 0).all()
        assert torch.allclose(a.sum(-1), torch.ones(2, 4, N), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(1, 3, 32, 32), return_attention=[7])


def test_forward_intermediates_typed_outputs():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=3, reg_tokens=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_intermediates(x, indices=None, norm=True, return_attention=[2])
    assert [lay.layer for lay in out.layers] == [0, 1, 2]
    last = out.layers[-1]
    assert last.patches.shape == (2, 32, 4, 4)
    assert last.cls.shape == (2, 32) and last.registers.shape == (2, 2, 32)
    assert last.attention.shape == (2, 4, 19, 19) and out.layers[0].attention is None
    with torch.no_grad():
        assert torch.allclose(out.tokens, model.forward_features(x), atol=1e-6)
        assert torch.allclose(model.forward_head(out.tokens), model(x), atol=1e-6)
    early = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert len(early.layers) == 1


def test_head_api_reset_classifier_and_no_weight_decay():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    feats = model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True)
    assert feats.shape == (2, 32)
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert torch.count_nonzero(model.head.weight) == 0
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    names = {n for n, _ in model.named_parameters()}
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay() | names


def test_attention_module_rejects_nothing_silently():
    attn = Attention(32, 4, backend="math")
    y, w = attn(torch.randn(2, 5, 32), need_weights=True)
    assert y.shape == (2, 5, 32) and w.shape == (2, 4, 5, 5)


def test_forward_features_keeps_only_the_asked_patch_tokens():
    """`keep` drops patch tokens after the position embedding: all of them in order is the plain forward, and a
    subset equals a model whose grid holds just those tokens at their positions (attention is permutation-equal)."""
    torch.manual_seed(0)
    model = vitkit.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_features(x)
        every = model.forward_features(x, keep=torch.arange(16).expand(2, 16))
        keep = torch.tensor([[0, 5, 9], [15, 2, 7]])
        part = model.forward_features(x, keep=keep)
    torch.testing.assert_close(every, full)
    assert part.shape == (2, 1 + 3, 64)
    with torch.no_grad():  # the same tokens by hand: embed, add positions, pick, encode
        tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
        picked = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, 64))
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1)
        h = torch.cat([cls, picked], dim=1)
        for blk in model.blocks:
            h, _ = blk(h)
    torch.testing.assert_close(part, model.norm(h), rtol=1e-5, atol=1e-5)
