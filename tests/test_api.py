"""Public API: names, parameter counts equal to timm's published numbers, save -> load round trip."""

import json

import pytest
import torch
from safetensors import safe_open

import vitkit
from vitkit.model.serialization import CheckpointError

from .conftest import tiny_kwargs

# Parameter counts timm publishes for these names with 1000 classes.
TIMM_PARAM_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_small_patch32_224": 22_878_952,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 632_045_800,
}


@pytest.mark.parametrize("name,count", list(TIMM_PARAM_COUNTS.items()))
def test_param_counts_match_timm(name, count):
    with torch.device("meta"):
        model = vitkit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_name_forms():
    assert vitkit.config_from_name("S/16").embed_dim == 384
    assert vitkit.config_from_name("B/32").patch_size == (32, 32)
    cfg = vitkit.config_from_name("vit_base_patch14_reg4_dinov2", img_size=518)
    assert cfg.reg_tokens == 4 and cfg.img_size == (518, 518)
    cfg = vitkit.config_from_name("vit_cifar_patch2_32")
    assert cfg.grid_size == (16, 16)
    cfg = vitkit.config_from_name("vit_base_patch16_224.augreg_in21k", num_classes=3, global_pool="avg")
    assert cfg.num_classes == 3 and cfg.use_fc_norm
    with pytest.raises(ValueError, match="unknown model name"):
        vitkit.create_model("resnet50")
    with pytest.raises(TypeError, match="unexpected keyword|unknown"):
        vitkit.create_model("S/16", not_an_option=1)
    assert "vit_cifar_patch4_32" in vitkit.list_models()


def test_save_load_round_trip_is_identical(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(reg_tokens=2, qk_norm=True, init_values=0.1))
    model.labels = ["a", "b", "c", "d", "e"]
    path = model.save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["preprocess"])["mean"] == list(model.preprocess.mean)
    assert json.loads(meta["config"])["reg_tokens"] == 2
    loaded = vitkit.from_pretrained(path)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.labels == model.labels and loaded.preprocess == model.preprocess
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp files


def test_from_pretrained_overrides_resample_and_replace_head(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    path = model.save(tmp_path / "m.safetensors")
    m2 = vitkit.from_pretrained(path, img_size=48, num_classes=7)
    assert m2(torch.randn(1, 3, 48, 48)).shape == (1, 7)
    assert m2.preprocess.input_size == (48, 48)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        vitkit.from_pretrained(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError):
        vitkit.from_pretrained(junk)


def test_single_channel_model_round_trips(tmp_path):
    model = vitkit.create_model("vit_digits_patch2_8")
    assert len(model.preprocess.mean) == 1
    loaded = vitkit.from_pretrained(model.save(tmp_path / "d.safetensors"))
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
