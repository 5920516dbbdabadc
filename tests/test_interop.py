"""Loading foreign checkpoints: parity with timm, transformers and torchvision (fp32, max |logit diff| <= 1e-4),
loud coverage reports, strict errors that name tensors, and pickle safety.

Every peer model is built with random weights (all parameters, norms included, so a swapped tensor shows),
saved in its native format, loaded with vitkit and compared on the same input.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit.interop import load_with_report
from vitkit.model.serialization import CheckpointError

timm = pytest.importorskip("timm")
TOL = 1e-4


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (LayerNorm weights around 1) so that any mis-mapped tensor changes the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if (p.ndim == 1 and name.endswith("weight")) else noise * 2)
    return model.eval()


def timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    base = dict(
        img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=5
    )  # 192: heads from the table
    base.update(kw)
    return randomize(VisionTransformer(**base))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -------------------------------------------------------------------------------------------------- timm
TIMM_CASES = {
    "cls": dict(),
    "avg": dict(class_token=False, global_pool="avg"),
    "clsgap": dict(global_pool="avg"),  # cls token kept, avg over patches, fc_norm
    "registers": dict(reg_tokens=4),
    "no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "qk_norm": dict(qk_norm=True),
    "layerscale": dict(init_values=0.1),
    "map": dict(class_token=False, global_pool="map"),
    "pre_norm": dict(pre_norm=True),
    "patch14_196px": dict(img_size=196, patch_size=14, depth=1),
    "size_48_patch16": dict(img_size=48, patch_size=16),
    "width768_heads_from_table": dict(embed_dim=768, num_heads=12, depth=1, img_size=32, patch_size=16),
}


@pytest.mark.parametrize(
    "case,suffix", [(c, ".pth") for c in TIMM_CASES] + [("cls", ".safetensors"), ("registers", ".bin")]
)
def test_timm_state_dict_parity(tmp_path, case, suffix):
    peer = timm_vit(**TIMM_CASES[case])
    path = tmp_path / f"m{suffix}"
    if suffix != ".safetensors":
        torch.save(peer.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    model, report = load_with_report(path)
    assert report.complete and not report.ignored and len(report.mapped) == len(peer.state_dict())
    x = torch.randn(2, 3, *peer.patch_embed.img_size)
    with torch.no_grad():
        assert max_diff(model(x), peer(x)) <= TOL
    assert model.cfg.global_pool == (peer.global_pool or "none")


def test_timm_training_checkpoint_is_unwrapped(tmp_path):
    peer = timm_vit()
    torch.save({"model": {f"module.{k}": v for k, v in peer.state_dict().items()}, "epoch": 3}, tmp_path / "c.pth")
    model, report = load_with_report(tmp_path / "c.pth")
    assert ("epoch", "training-checkpoint entry next to 'model'") in report.ignored
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), peer(x)) <= TOL


def test_timm_hub_folder_non_square_with_preprocessing_and_labels(tmp_path):
    from timm.models import save_for_hf

    peer = randomize(
        timm.create_model(
            "vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3
        )
    )
    save_for_hf(
        peer,
        str(tmp_path / "hub"),
        model_config={"label_names": ["cat", "dog", "eel"]},
        data_config={"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "crop_pct": 0.8, "interpolation": "bilinear"},
    )
    model = vitkit.from_pretrained(tmp_path / "hub")
    assert model.cfg.img_size == (32, 48) and model.cfg.num_heads == 4
    assert model.labels == ["cat", "dog", "eel"]
    assert model.preprocess.mean == (0.1, 0.2, 0.3) and model.preprocess.std == (0.4, 0.5, 0.6)
    assert model.preprocess.crop_pct == 0.8 and model.preprocess.interpolation == "bilinear"
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert max_diff(model(x), peer(x)) <= TOL
    # the preprocessing and labels travel into the converted checkpoint
    again = vitkit.from_pretrained(model.save(tmp_path / "v.safetensors"))
    assert again.preprocess == model.preprocess and again.labels == model.labels


def test_overrides_resample_positions_and_replace_head(tmp_path):
    from timm.models.vision_transformer import checkpoint_filter_fn

    peer = timm_vit(reg_tokens=1)
    torch.save(peer.state_dict(), tmp_path / "m.pth")
    model = vitkit.from_pretrained(tmp_path / "m.pth", img_size=48, num_classes=7)
    assert model.cfg.img_size == (48, 48) and model.cfg.num_classes == 7
    assert torch.count_nonzero(model.head.weight) == 0  # a fresh zero head
    big = timm_vit(reg_tokens=1, img_size=48)  # timm's own resampling of the same weights, for reference
    big.load_state_dict(checkpoint_filter_fn(peer.state_dict(), big))
    assert torch.allclose(model.pos_embed, big.pos_embed, atol=1e-5)
    assert torch.equal(model.pos_embed[:, :2], peer.pos_embed[:, :2])  # prefix untouched
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert (
            max_diff(
                model.forward_head(model.forward_features(x), pre_logits=True),
                big.forward_head(big.forward_features(x), pre_logits=True),
            )
            <= TOL
        )


# ---------------------------------------------------------------------------------------- transformers
def hf_config(**kw):
    from transformers import ViTConfig

    base = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    base.update(kw)
    return ViTConfig(**base)


def test_hf_image_classification_parity_labels_and_preprocessing(tmp_path):
    from transformers import ViTForImageClassification, ViTImageProcessor

    cfg = hf_config(num_labels=3, id2label={0: "ant", 1: "bee", 2: "cow"}, label2id={"ant": 0, "bee": 1, "cow": 2})
    peer = randomize(ViTForImageClassification(cfg))
    peer.save_pretrained(tmp_path / "hf")
    ViTImageProcessor(
        image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2], resample=3, size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path / "hf")
    model, report = load_with_report(tmp_path / "hf")
    assert report.complete and model.cfg.norm_eps == 1e-12
    assert model.labels == ["ant", "bee", "cow"]
    assert model.preprocess.mean == (0.4, 0.4, 0.4) and model.preprocess.interpolation == "bicubic"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), peer(pixel_values=x).logits) <= TOL


def test_hf_vit_model_pooler_is_ignored_with_reason_and_features_match(tmp_path):
    from transformers import ViTModel

    peer = randomize(ViTModel(hf_config(qkv_bias=True)))
    (tmp_path / "hf").mkdir()
    peer.config.save_pretrained(tmp_path / "hf")
    torch.save(peer.state_dict(), tmp_path / "hf" / "pytorch_model.bin")  # the pickle container
    model, report = load_with_report(tmp_path / "hf")
    assert {src for src, _ in report.ignored} == {"pooler.dense.weight", "pooler.dense.bias"}
    assert "pooler" in report.details() and model.cfg.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = peer(pixel_values=x)
        assert max_diff(model.forward_features(x), out.last_hidden_state) <= TOL
        assert max_diff(model(x), out.last_hidden_state[:, 0]) <= TOL  # no head: the pooled cls features


# ------------------------------------------------------------------------------------------ torchvision
def test_torchvision_custom_size_parity_and_heads(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    peer = randomize(
        VisionTransformer(
            image_size=48, patch_size=16, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
        )
    )
    torch.save(peer.state_dict(), tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="num_heads"):  # width 32 is not standard: the heads must be given
        vitkit.from_pretrained(tmp_path / "tv.pth")
    model = vitkit.from_pretrained(tmp_path / "tv.pth", num_heads=4)
    assert model.preprocess.mean == (0.485, 0.456, 0.406) and model.preprocess.interpolation == "bilinear"
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert max_diff(model(x), peer(x)) <= TOL


def test_torchvision_standard_width_takes_heads_from_table(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    # vit_b_16's width (768 -> 12 heads) with one layer at 32 px keeps the test fast
    peer = randomize(
        VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=4
        )
    )
    torch.save(peer.state_dict(), tmp_path / "tv.pth")
    model = vitkit.from_pretrained(tmp_path / "tv.pth")
    assert model.cfg.num_heads == 12
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), peer(x)) <= TOL


# ---------------------------------------------------------------------------------- loud, strict, safe
def test_missing_extra_and_wrong_shape_are_named(tmp_path):
    state = timm_vit().state_dict()
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        vitkit.from_pretrained(tmp_path / "missing.pth")

    torch.save(dict(state, **{"blocks.0.attn.mystery": torch.zeros(3)}), tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.mystery"):
        vitkit.from_pretrained(tmp_path / "extra.pth")

    torch.save(dict(state, **{"blocks.0.norm2.weight": torch.ones(31)}), tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.norm2\.weight.*\(31,\)"):
        vitkit.from_pretrained(tmp_path / "shape.pth")

    model, report = load_with_report(tmp_path / "missing.pth", strict=False)  # loads, and says what is missing
    assert report.missing == ["blocks.1.mlp.fc2.bias"] and not report.complete
    assert torch.equal(model.blocks[0].mlp.fc2.weight, state["blocks.0.mlp.fc2.weight"])
    _, report = load_with_report(tmp_path / "extra.pth", strict=False)
    assert any("mystery" in u for u in report.unmatched)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        vitkit.from_pretrained(tmp_path / "evil.pth")
    assert not marker.exists()


def test_unknown_layouts_fail_clearly(tmp_path):
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="no known ViT layout"):
        vitkit.from_pretrained(tmp_path / "resnet.pth")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="neither a timm"):
        vitkit.from_pretrained(tmp_path / "folder")


def test_convert_cli_writes_checkpoint_and_prints_report(tmp_path, capsys):
    from vitkit.cli import main

    peer = timm_vit(reg_tokens=1)
    torch.save(peer.state_dict(), tmp_path / "m.pth")
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "out.safetensors"), "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "mapped" in out and "0 missing" in out and "out.safetensors" in out
    model = vitkit.from_pretrained(tmp_path / "out.safetensors")
    assert model.cfg.num_classes == 3 and model.cfg.reg_tokens == 1
    torch.save({k: v for k, v in peer.state_dict().items() if k != "norm.bias"}, tmp_path / "bad.pth")
    assert main(["convert", str(tmp_path / "bad.pth"), str(tmp_path / "bad.safetensors")]) == 1
    assert "norm.bias" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()
    assert main(["convert", str(tmp_path / "bad.pth"), str(tmp_path / "ok.safetensors"), "--no-strict"]) == 0


def test_non_square_bare_state_dict_needs_and_takes_img_size(tmp_path):
    ambiguous = timm_vit(img_size=(32, 48))  # 4 x 6 + cls = 25 = 5 x 5: the asked size settles which it is
    torch.save(ambiguous.state_dict(), tmp_path / "a.pth")
    model = vitkit.from_pretrained(tmp_path / "a.pth", img_size=(32, 48))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert model.cfg.img_size == (32, 48) and max_diff(model(x), ambiguous(x)) <= TOL

    peer = timm_vit(img_size=(32, 40))  # 4 x 5 patches + cls = 21 positions: no square grid fits
    torch.save(peer.state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="img_size"):
        vitkit.from_pretrained(tmp_path / "m.pth")
    model = vitkit.from_pretrained(tmp_path / "m.pth", img_size=(32, 40))
    assert model.cfg.img_size == (32, 40)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        assert max_diff(model(x), peer(x)) <= TOL
