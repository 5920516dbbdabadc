"""Pretrained RGB weights for other channel counts: `from_pretrained(..., in_chans=k)` and train/finetune on
grayscale data (vitkit.interop.adapt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from vitkit.interop import apply_overrides
from vitkit.interop.adapt import adapt_channel_stats, adapt_input_conv

from .conftest import tiny_kwargs


def _rgb_model(**kw) -> vitkit.VisionTransformer:
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(**kw)).eval()
    with torch.no_grad():  # a zero-initialised bias or a tiny token would hide a wrong channel rule
        model.patch_embed.proj.bias.normal_()
    return model


def _logits(model: vitkit.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_conv_rule_sums_for_one_channel_repeats_and_rescales_for_more():
    w = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    torch.testing.assert_close(adapt_input_conv(w, 2), w[:, :2] * 1.5)
    torch.testing.assert_close(adapt_input_conv(w, 4), torch.cat([w, w[:, :1]], 1) * 0.75)
    assert adapt_input_conv(w, 3) is w
    assert adapt_input_conv(w.half(), 1).dtype == torch.float16
    with pytest.raises(ValueError, match=">= 1"):
        adapt_input_conv(w, 0)


def test_stats_follow_the_channels():
    assert adapt_channel_stats((0.2, 0.4, 0.6), 1) == pytest.approx((0.4,))
    assert adapt_channel_stats((0.2, 0.4, 0.6), 4) == (0.2, 0.4, 0.6, 0.2)


def test_gray_model_equals_rgb_model_on_the_gray_image_repeated(tmp_path):
    rgb = _rgb_model()
    path = rgb.save(tmp_path / "rgb.safetensors")
    gray = vitkit.from_pretrained(path, in_chans=1)
    assert gray.cfg.in_chans == 1 and gray.patch_embed.proj.weight.shape[1] == 1
    assert gray.preprocess.mean == pytest.approx((sum(rgb.preprocess.mean) / 3,))
    g = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(_logits(gray, g), _logits(rgb, g.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
    reloaded = vitkit.from_pretrained(gray.save(tmp_path / "gray.safetensors"))  # the channel count is saved
    assert reloaded.cfg.in_chans == 1 and len(reloaded.preprocess.mean) == 1


def test_six_channels_carrying_rgb_twice_give_the_rgb_logits():
    """Repeat-and-rescale: [R, G, B, R, G, B] through the 6-channel model is RGB through the original."""
    rgb = _rgb_model()
    six = apply_overrides(rgb, in_chans=6)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(six, torch.cat([x, x], 1)), _logits(rgb, x), atol=1e-5, rtol=1e-5)


def test_four_channels_from_a_timm_state_dict(tmp_path):
    """A foreign checkpoint (timm's names) loads strictly for 4 channels instead of a size-mismatch error."""
    rgb = _rgb_model(num_classes=0)
    torch.save(rgb.state_dict(), tmp_path / "timm.pth")
    four = vitkit.from_pretrained(tmp_path / "timm.pth", in_chans=4, num_heads=4, num_classes=7)
    assert four.cfg.in_chans == 4 and len(four.preprocess.mean) == 4 and four.cfg.num_classes == 7
    assert _logits(four, torch.randn(2, 4, 32, 32)).shape == (2, 7)
    torch.testing.assert_close(four.patch_embed.proj.weight[:, 3], rgb.patch_embed.proj.weight[:, 0] * 0.75)


def test_conv_stem_adapts_its_first_conv():
    rgb = vitkit.create_model(
        "vit_tiny_patch16_224", **tiny_kwargs(stem="conv", stem_layers=((8, 2), (16, 2), (16, 2)))
    ).eval()
    gray = apply_overrides(rgb, in_chans=1)
    assert gray.patch_embed.stem[0].weight.shape[1] == 1
    g = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(_logits(gray, g), _logits(rgb, g.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_train_from_pretrained_rgb_takes_the_datas_channels(tmp_path):
    """`vitkit train --model RGB.safetensors` on 1- or 4-channel data: the model takes the data's channels."""
    from vitkit.data.sources import ImageArrayDataset
    from vitkit.train.build import build_model
    from vitkit.train.recipe import TrainConfig

    rgb = vitkit.create_model("vit_digits_patch2_8", in_chans=3, num_classes=3, depth=1)
    path = rgb.save(tmp_path / "rgb.safetensors")
    for channels in (1, 4):
        images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, channels), dtype=np.uint8)
        ds = ImageArrayDataset(images, np.arange(6) % 2, ["a", "b"])
        model = build_model(TrainConfig(model=str(path)), ds, np.arange(6))
        assert model.cfg.in_chans == channels and len(model.preprocess.mean) == channels
        assert model.cfg.num_classes == 2


def test_finetune_rgb_weights_on_grayscale_digits(tmp_path):
    from vitkit.train import finetune

    rgb = vitkit.create_model("vit_digits_patch2_8", in_chans=3, num_classes=3, depth=1)
    path = rgb.save(tmp_path / "rgb.safetensors")
    res = finetune(path, "digits", out=tmp_path / "ft", epochs=0.2, batch_size=128, progress=False,
                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    model = vitkit.from_pretrained(res.model_path)
    assert model.cfg.in_chans == 1 and model.cfg.num_classes == 10 and len(model.preprocess.mean) == 1
    kept = finetune(path, "digits", out=tmp_path / "probe", freeze_backbone=True, progress=False,
                    cache_dir=str(tmp_path / "cache"), model_overrides={"in_chans": 3})  # fmt: skip
    assert vitkit.from_pretrained(kept.model_path).cfg.in_chans == 3  # asked for RGB: the data is repeated
