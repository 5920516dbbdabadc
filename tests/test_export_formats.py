"""Weights out: `save_pretrained(DIR, format="vitkit" | "hf" | "timm")` and `vitkit convert --to`.

Each exported folder is loaded by the peer library's own loader (transformers' from_pretrained, timm's
`local-dir:`) and must give vitkit's logits (fp32, max |diff| <= 1e-4), with class names and preprocessing in
that library's own fields; the folder loads back into vitkit unchanged. What a format cannot express is one
error naming all of it, and nothing is written. Every model has random weights everywhere (norms, LayerScale,
tokens), so a mis-mapped tensor shows in the logits.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

import vitkit
from vitkit.cli import main
from vitkit.interop.card import model_card
from vitkit.interop.timm import TIMM_PLAIN_VITS, timm_architecture
from vitkit.model.serialization import ExportError, is_vitkit_checkpoint

TOL = 1e-4
LABELS = ["cat", "dog", "eel", "fox", "gnu"]


def tiny(**kw) -> vitkit.VisionTransformer:
    """A tiny ViT with every parameter random (LayerNorm weights around 1) and class names."""
    base = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    base.update(kw)
    model = vitkit.create_model(vitkit.ViTConfig(**base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if (p.ndim == 1 and name.endswith(("weight", "gamma"))) else noise * 2)
    model.labels = LABELS[: model.cfg.num_classes] if model.cfg.num_classes else None
    return model.eval()


def image_batch(model: vitkit.VisionTransformer) -> torch.Tensor:
    return torch.randn(2, model.cfg.in_chans, *model.cfg.img_size, generator=torch.Generator().manual_seed(2))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_loads_back(model: vitkit.VisionTransformer, folder, exact_config: bool) -> None:
    """vitkit reads its own export back: same logits, class names and preprocessing (the config too when the
    format holds every option as vitkit has it)."""
    back = vitkit.from_pretrained(folder)
    x = image_batch(model)
    with torch.no_grad():
        assert max_diff(back(x), model(x)) <= TOL
    assert back.labels == model.labels
    assert back.preprocess.mean == pytest.approx(model.preprocess.mean)
    assert back.preprocess.std == pytest.approx(model.preprocess.std)
    assert back.preprocess.interpolation == model.preprocess.interpolation
    assert back.preprocess.input_size == model.preprocess.input_size
    if exact_config:  # options that only say how to initialise (fc_norm=None: as the pooling says) as resolved

        def resolved(cfg):
            return cfg.replace(fc_norm=cfg.use_fc_norm, init_values=cfg.init_values is not None or None)

        assert resolved(back.cfg) == resolved(model.cfg)
        assert back.state_dict().keys() == model.state_dict().keys()


# ------------------------------------------------------------------------------------------ transformers
transformers = pytest.importorskip("transformers")

HF_CASES = {
    "plain": dict(),
    "hf_style": dict(qkv_bias=False, norm_eps=1e-12, mlp_ratio=3.0),
    "non_square": dict(img_size=(32, 48), patch_size=(8, 16)),
    "one_channel": dict(in_chans=1, num_classes=2),
    # the same function as a plain ViT: gammas folded into the linear layers, zero position rows for cls
    "layerscale": dict(init_values=0.1),
    "no_embed_class": dict(no_embed_class=True),
    "sincos": dict(pos_embed="sincos2d"),
    "no_pos_embed": dict(pos_embed="none"),
}
HF_AS_IS = {"plain", "hf_style", "non_square", "one_channel"}  # configs transformers holds without a rewrite


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_export_parity_with_transformers(tmp_path, case):
    model = tiny(**HF_CASES[case])
    out = model.save_pretrained(tmp_path / "hf", format="hf")
    peer = transformers.ViTForImageClassification.from_pretrained(out).eval()
    x = image_batch(model)
    with torch.no_grad():
        assert max_diff(peer(x).logits, model(x)) <= TOL
    assert peer.config.id2label == dict(enumerate(model.labels))
    assert peer.config.label2id == {name: i for i, name in enumerate(model.labels)}
    assert_loads_back(model, out, exact_config=False)
    if case in HF_AS_IS:
        assert vitkit.from_pretrained(out).state_dict().keys() == model.state_dict().keys()


def test_hf_export_of_a_headless_model_is_a_vit_model(tmp_path):
    model = tiny(num_classes=0)
    out = model.save_pretrained(tmp_path / "hf", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ViTModel"] and "id2label" not in config
    peer = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
    x = image_batch(model)
    with torch.no_grad():
        assert max_diff(peer(x).last_hidden_state[:, 0], model(x)) <= TOL  # the final-normed class token
    assert vitkit.from_pretrained(out).cfg.num_classes == 0


def test_hf_export_without_class_names_uses_transformers_placeholders(tmp_path):
    model = tiny()
    model.labels = None
    out = model.save_pretrained(tmp_path / "hf", format="hf")
    assert transformers.ViTForImageClassification.from_pretrained(out).config.num_labels == 5
    assert vitkit.from_pretrained(out).labels is None  # LABEL_i are read as "no names"


@pytest.mark.parametrize("size", [(64, 64), (48, 64)])
def test_hf_preprocessing_matches_vitkit_pixel_for_pixel(tmp_path, size):
    """transformers' image processor from the exported file prepares an image as vitkit does: resize the shorter
    side to size / crop_pct (both sides for a non-square size), center-crop, normalise (ViTImageProcessor would
    squash it instead)."""
    from vitkit.data.preprocess import preprocess_image

    model = tiny(img_size=size, patch_size=16)
    model.preprocess.crop_pct, model.preprocess.mean = 0.875, (0.485, 0.456, 0.406)
    model.preprocess.std, model.preprocess.interpolation = (0.229, 0.224, 0.225), "bilinear"
    out = model.save_pretrained(tmp_path / "hf", format="hf")
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == pytest.approx(model.preprocess.mean)
    assert list(processor.image_std) == pytest.approx(model.preprocess.std)
    rgb = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)  # wider than tall
    theirs = processor(images=rgb, return_tensors="pt")["pixel_values"][0]
    ours = preprocess_image(rgb, model.preprocess)
    assert theirs.shape == ours.shape == (3, *size)
    # transformers 5 resizes with torchvision as vitkit does (the same pixels); 4.x with PIL (kernels differ)
    same_pixels = int(transformers.__version__.split(".")[0]) >= 5
    assert (theirs - ours).abs().max().item() < 1e-5 if same_pixels else (theirs - ours).abs().mean().item() < 0.02
    back = vitkit.from_pretrained(out).preprocess  # one crop_pct for both sides: the resize to within a pixel
    assert all(abs(math.floor(s / back.crop_pct) - math.floor(s / 0.875)) <= 1 for s in size)
    assert back.interpolation == "bilinear"


def test_hf_export_refuses_what_transformers_vit_cannot_express(tmp_path):
    model = tiny(stem="conv", reg_tokens=2, class_token=False, global_pool="avg", qk_norm=True)
    with pytest.raises(ExportError) as err:
        model.save_pretrained(tmp_path / "hf", format="hf")
    message = str(err.value)
    assert "\n" not in message and message.startswith("transformers' ViT cannot express this model")
    for what in ("conv stem", "no class token", "2 register tokens", "global_pool='avg'", "fc_norm", "qk_norm"):
        assert what in message
    assert not (tmp_path / "hf").exists()


def test_hf_export_names_a_single_problem(tmp_path):
    with pytest.raises(ExportError, match=r"pre_norm \(a LayerNorm before the blocks\)\. Save it with"):
        tiny(pre_norm=True).save_pretrained(tmp_path / "hf", format="hf")


# -------------------------------------------------------------------------------------------------- timm
timm = pytest.importorskip("timm")

TIMM_CASES = {
    "plain": dict(),
    "gap_registers": dict(class_token=False, global_pool="avg", reg_tokens=4),
    "clsgap": dict(global_pool="avg"),
    "map": dict(class_token=False, global_pool="map"),
    "qk_norm_layerscale": dict(qk_norm=True, init_values=1e-5),
    "no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "no_head_no_pool": dict(num_classes=0, global_pool="none"),
    "fc_norm_on_token": dict(fc_norm=True),
    "dynamic": dict(dynamic_img_size=True),
    "non_square_4_channels": dict(img_size=(32, 48), patch_size=(8, 16), in_chans=4),
    # rewritten into timm's options: a learned patches-only table, the pre-norm patch bias moved into it
    "sincos": dict(pos_embed="sincos2d"),
    "pre_norm": dict(pre_norm=True),
    "pre_norm_no_pos_embed": dict(pre_norm=True, pos_embed="none", class_token=False, global_pool="avg"),
    "no_pos_embed": dict(pos_embed="none"),
}
TIMM_AS_IS = set(TIMM_CASES) - {"sincos", "pre_norm", "pre_norm_no_pos_embed"}


def load_timm_folder(folder):
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_export_parity_with_timm(tmp_path, case):
    model = tiny(**TIMM_CASES[case])
    out = model.save_pretrained(tmp_path / "timm", format="timm")
    peer = load_timm_folder(out)
    x = image_batch(model)
    with torch.no_grad():
        assert max_diff(peer(x), model(x)) <= TOL
    cfg = peer.pretrained_cfg
    assert cfg["label_names"] == model.labels if model.labels else "label_names" not in cfg
    assert tuple(cfg["input_size"]) == (model.cfg.in_chans, *model.preprocess.input_size)
    assert cfg["crop_pct"] == model.preprocess.crop_pct and cfg["interpolation"] == model.preprocess.interpolation
    assert len(cfg["mean"]) == len(cfg["std"]) == model.cfg.in_chans
    assert_loads_back(model, out, exact_config=case in TIMM_AS_IS)


def test_timm_export_when_dynamic_accepts_other_sizes_like_vitkit(tmp_path):
    model = tiny(dynamic_img_size=True)
    peer = load_timm_folder(model.save_pretrained(tmp_path / "timm", format="timm"))
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert max_diff(peer(x), model(x)) <= TOL


def test_timm_config_mirrors_timm_save_for_hf(tmp_path):
    """The keys timm's own save_for_hf writes, and its data config read back as timm resolves it."""
    model = tiny(img_size=64, patch_size=16, embed_dim=384, depth=1, num_heads=6)
    out = model.save_pretrained(tmp_path / "timm", format="timm")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224"
    assert {"architecture", "num_classes", "num_features", "label_names", "model_args", "pretrained_cfg"} <= set(config)
    assert config["model_args"]["img_size"] == [64, 64] and config["model_args"]["depth"] == 1
    data = timm.data.resolve_data_config({}, model=load_timm_folder(out))
    assert data["input_size"] == (3, 64, 64) and data["crop_pct"] == model.preprocess.crop_pct
    assert data["mean"] == pytest.approx(model.preprocess.mean)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # a plain timm file: config.json is its description


def test_timm_plain_architectures_exist_in_timm():
    assert set(TIMM_PLAIN_VITS) <= set(timm.list_models("vit_*"))


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=224), "vit_small_patch16_224"),
        (dict(embed_dim=768, depth=12, num_heads=12, patch_size=32, img_size=384), "vit_base_patch32_384"),
        (dict(embed_dim=1024, depth=24, num_heads=16, patch_size=14, img_size=224), "vit_large_patch14_224"),
        (dict(embed_dim=192, depth=12, num_heads=3, patch_size=8, img_size=32), "vit_tiny_patch16_224"),
    ],
)
def test_timm_architecture_is_the_closest_plain_vit(kw, name):
    assert timm_architecture(vitkit.ViTConfig(**kw)) == name


def test_timm_export_refuses_what_timm_cannot_express(tmp_path):
    with pytest.raises(ExportError) as err:
        tiny(stem="conv", norm_eps=1e-12).save_pretrained(tmp_path / "timm", format="timm")
    message = str(err.value)
    assert "\n" not in message and message.startswith("timm's VisionTransformer cannot express this model")
    assert "the conv stem (stem='conv'" in message and "LayerNorm eps 1e-12" in message
    assert not (tmp_path / "timm").exists()


# ------------------------------------------------------------------------------------------ vitkit folder
def test_vitkit_folder_loads_back_exactly(tmp_path):
    model = tiny(stem="conv", reg_tokens=1)  # what neither peer format can hold
    out = model.save_pretrained(tmp_path / "vk", steps="12")
    assert is_vitkit_checkpoint(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["library_name"] == "vitkit" and config["labels"] == LABELS
    assert_loads_back(model, out, exact_config=True)
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: vitkit\n")


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'onnx'; known formats: hf, timm, vitkit"):
        tiny().save_pretrained(tmp_path / "x", format="onnx")


# ------------------------------------------------------------------------------------------- model card
def write_run(run_dir, model):
    """A run folder as `vitkit train` leaves it: metrics.jsonl through its own logger, then model.safetensors."""
    from vitkit.train.logging import RunLogger

    log = RunLogger(run_dir, total_steps=20, tensorboard=False, show_bar=False)
    log.log("info", 0, config={"data": "pets/", "val_data": None, "val_split": 0.1, "model": "S/16"}, params=1)
    log.log("val", 10, epoch=1, train_loss=1.5, val_top1=0.5, val_top5=0.9, val_loss=1.2)
    log.log("val", 20, epoch=2, train_loss=1.1, val_top1=0.625, val_top5=1.0, val_loss=0.9)
    log.log("final", 20, epoch=2.0, best_weights="raw", val_top1=0.625, val_top5=1.0, val_loss=0.9)
    log.close()
    return model.save(run_dir / "model.safetensors", weights="raw", steps="20", val_top1="0.6250")


def test_model_card_has_architecture_data_metrics_and_loading(tmp_path):
    model = tiny()
    checkpoint = write_run(tmp_path / "runs" / "pets", model)
    out = tmp_path / "hf"
    assert main(["convert", str(checkpoint), str(out), "--to", "hf"]) == 0
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: transformers" in front and "pipeline_tag: image-classification" in front
    assert "- vitkit" in front and "license" not in front
    params = sum(p.numel() for p in model.parameters())
    for text in (f"| parameters | {params:,} |", "| image size | 32x32 |", "| patch size | 8x8 |", "| classes | 5 |"):
        assert text in body
    assert "training data: `pets/`" in body and "validation: 0.1 of the training data" in body
    assert "classes: cat, dog, eel, fox, gnu" in body and f"converted from: `{checkpoint}`" in body
    assert "| val_top1 | val_top5 | val_loss | epoch | step | weights |" in body
    assert "| 0.6250 | 1.0000 | 0.9000 | 2.0000 | 20 | raw |" in body
    assert "| 10 | 1 | 1.5000 | 0.5000 | 0.9000 | 1.2000 |" in body  # the evaluations during training
    assert f'ViTForImageClassification.from_pretrained("{out}")' in body and "import timm" not in body


def test_model_card_for_the_hub_and_a_headless_model(tmp_path):
    model = tiny(num_classes=0)
    card = model_card(model, "timm", "me/tiny-vit", hub=True, license="apache-2.0")
    assert "pipeline_tag: image-feature-extraction" in card and "license: apache-2.0" in card
    assert 'timm.create_model("hf-hub:me/tiny-vit", pretrained=True)' in card
    assert 'vitkit.from_pretrained("me/tiny-vit")' in card and "feature extractor" in card
    assert "Not recorded with this checkpoint." in card and "No evaluation was recorded" in card


def test_model_card_names_a_standard_variant(tmp_path):
    model = vitkit.create_model("vit_small_patch16_224", img_size=32, num_classes=3)
    assert "A Vision Transformer (ViT-S/16) 3-class image classifier" in model_card(model, "vitkit", "x")


# ------------------------------------------------------------------------------------------------ the CLI
def test_convert_to_timm_then_timm_loads_it(tmp_path, capsys):
    model = tiny()
    src = model.save(tmp_path / "m.safetensors")
    assert main(["convert", str(src), str(tmp_path / "t"), "--to", "timm"]) == 0
    assert "(timm folder with README.md)" in capsys.readouterr().out
    x = image_batch(model)
    with torch.no_grad():
        assert max_diff(load_timm_folder(tmp_path / "t")(x), model(x)) <= TOL


def test_convert_default_still_writes_one_vitkit_file(tmp_path):
    src = tiny().save(tmp_path / "m.safetensors")
    assert main(["convert", str(src), str(tmp_path / "copy.safetensors")]) == 0
    assert is_vitkit_checkpoint(tmp_path / "copy.safetensors")


def test_convert_to_hf_of_a_conv_stem_model_is_one_error_line(tmp_path, capsys):
    src = tiny(stem="conv").save(tmp_path / "m.safetensors")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vitkit convert: error: transformers' ViT cannot express" in err
    assert "conv stem" in err
