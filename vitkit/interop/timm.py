"""timm checkpoints: a plain state dict (.pth / .bin / .safetensors) or a folder as timm saves for the HF Hub.

vitkit uses timm's module names, so tensors map 1:1; what a state dict cannot say (head count, image size,
preprocessing, labels) comes from the folder's config.json (`architecture`, `model_args`, `pretrained_cfg`).

Writing (`write_timm_folder`) lays a folder out as timm's `save_for_hf` does: config.json with the closest plain
timm architecture, every constructor argument in `model_args` (so the folder does not depend on that
architecture's defaults), `pretrained_cfg` with the preprocessing, `label_names`; and model.safetensors.
`timm.create_model("local-dir:DIR", pretrained=True)` loads it; so does `hf-hub:` once pushed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import PreprocessConfig, ViTConfig, config_from_name, field_names, to_2tuple
from ..model import VisionTransformer
from ..model.serialization import WEIGHTS_FILE, CheckpointError
from .common import Converted, read_safetensors, read_torch_file, unwrap_state_dict
from .report import LoadReport
from .writing import channel_stats, position_table, unsupported, write_json, write_weights

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def is_timm_state(keys: set[str]) -> bool:
    return "patch_embed.proj.weight" in keys


def convert_timm_state(state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """timm names are vitkit names; only legacy spellings are renamed and unused layers set aside."""
    out = {}
    for k, v in state.items():
        if k.startswith("pre_logits."):
            report.ignore(k, "representation layer of early ViT checkpoints; timm drops it too")
            continue
        new = re.sub(r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma", k)  # DeiT-III LayerScale
        if new != k:
            report.reshape(k, new, tuple(v.shape), tuple(v.shape))
        else:
            report.map(k, k)
        out[new] = v
    if "norm_pre.weight" in out and "patch_embed.proj.weight" in out and "patch_embed.proj.bias" not in out:
        # CLIP-style pre-norm models have a bias-free patch embedding; a zero bias computes the same
        out["patch_embed.proj.bias"] = torch.zeros(out["patch_embed.proj.weight"].shape[0])
        report.note("patch embedding has no bias (pre-norm model); an equivalent zero bias was added")
    return out


def read_weights(path: Path) -> dict[str, Any]:
    return read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)


def load_timm_file(path: Path, tensors: dict[str, Any] | None = None) -> Converted:
    """A bare timm state dict: shapes say the architecture; preprocessing falls back to timm's ViT default."""
    report = LoadReport(str(path), "timm state dict")
    state = unwrap_state_dict(tensors if tensors is not None else read_weights(path), report)
    conv = Converted(convert_timm_state(state, report), report)
    conv.preprocess = PreprocessConfig()  # timm's ViT default: 0.5/0.5, bicubic, crop 0.9
    report.note(
        "no preprocessing stored in a bare state dict; timm's ViT default used (mean/std 0.5, bicubic, crop 0.9)"
    )
    return conv


def _preprocess_from_pretrained_cfg(pc: dict[str, Any], report: LoadReport) -> PreprocessConfig:
    pre = PreprocessConfig()
    if "input_size" in pc:
        pre.input_size = to_2tuple(list(pc["input_size"])[-2:])
    if "mean" in pc:
        pre.mean = tuple(float(x) for x in pc["mean"])
    if "std" in pc:
        pre.std = tuple(float(x) for x in pc["std"])
    if "crop_pct" in pc:
        pre.crop_pct = float(pc["crop_pct"])
    interp = pc.get("interpolation", "bicubic")
    if interp in INTERPOLATIONS:
        pre.interpolation = interp
    else:
        report.note(f"pretrained_cfg interpolation {interp!r} not supported; bicubic used")
    return pre


def _labels(cfg: dict[str, Any]) -> list[str] | None:
    names = cfg.get("label_names", cfg.get("pretrained_cfg", {}).get("label_names"))
    if isinstance(names, dict):  # {index: name}, possibly with gaps
        n = max(int(i) for i in names) + 1
        return [str(names.get(str(i), names.get(i, str(i)))) for i in range(n)]  # type: ignore[call-overload]
    return [str(x) for x in names] if names else None


def load_timm_hub_folder(folder: Path) -> Converted:
    """A folder with timm's config.json (architecture, model_args, pretrained_cfg) and model weights."""
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{cfg_path}' is not readable JSON: {e}") from e
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"'{folder}': no weights file found (looked for {', '.join(WEIGHT_FILES)})")
    report = LoadReport(str(folder), "timm Hub folder")
    state = unwrap_state_dict(read_weights(weights), report)
    conv = Converted(convert_timm_state(state, report), report)

    arch = cfg.get("architecture", "")
    try:  # the name says heads (and more) for timm's ViT family
        named = config_from_name(arch)
        conv.hints.update(num_heads=named.num_heads, img_size=named.img_size)
    except (ValueError, KeyError):
        report.note(f"architecture {arch!r} is not a name vitkit decodes; head count from the width table")
    pc = cfg.get("pretrained_cfg", {})
    if "input_size" in pc:
        conv.hints["img_size"] = to_2tuple(list(pc["input_size"])[-2:])
    known = set(field_names())
    for k, v in cfg.get("model_args", {}).items():
        if k in known:
            conv.hints[k] = "none" if (k == "global_pool" and v == "") else v
        else:
            report.note(f"model_args {k}={v!r} has no vitkit equivalent and was not applied")
    if "img_size" in conv.hints:
        conv.hints["img_size"] = to_2tuple(conv.hints["img_size"])
    if "global_pool" not in conv.hints and cfg.get("global_pool"):
        conv.hints["global_pool"] = cfg["global_pool"]
    conv.preprocess = _preprocess_from_pretrained_cfg(pc, report)
    conv.labels = _labels(cfg)
    return conv


# ------------------------------------------------------------------------------------------------ writing
# timm's plain ViT factories (tests/test_export_formats.py checks each is in timm.list_models()); the folder names
# the closest as its architecture, and model_args give every argument, so any of them rebuilds the same model
TIMM_PLAIN_VITS = (
    "vit_tiny_patch16_224",
    "vit_tiny_patch16_384",
    "vit_small_patch8_224",
    "vit_small_patch16_224",
    "vit_small_patch16_384",
    "vit_small_patch32_224",
    "vit_small_patch32_384",
    "vit_base_patch8_224",
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_base_patch32_224",
    "vit_base_patch32_384",
    "vit_large_patch14_224",
    "vit_large_patch16_224",
    "vit_large_patch16_384",
    "vit_large_patch32_224",
    "vit_large_patch32_384",
    "vit_huge_patch14_224",
    "vit_giant_patch14_224",
    "vit_gigantic_patch14_224",
)
TIMM_NORM_EPS = 1e-6  # timm's VisionTransformer LayerNorm; its config.json has no argument that changes it


def timm_architecture(cfg: ViTConfig) -> str:
    """The plain timm ViT closest to `cfg`: same width first, then the nearest width, then patch, then size."""

    def distance(name: str) -> tuple:
        named = config_from_name(name)
        return (
            (named.embed_dim, named.depth) != (cfg.embed_dim, cfg.depth),
            abs(named.embed_dim - cfg.embed_dim),
            named.patch_size != cfg.patch_size,
            named.img_size != cfg.img_size,
        )

    return min(TIMM_PLAIN_VITS, key=distance)


def timm_problems(model: VisionTransformer) -> list[str]:
    """What timm's VisionTransformer (the `vit_*` family) cannot build from config.json."""
    cfg = model.cfg
    checks = [
        (cfg.stem != "patch", "the conv stem (stem='conv'; timm's vit_* models embed patches with one strided conv)"),
        (cfg.global_pool == "seqpool", "sequence pooling (global_pool='seqpool'; timm's ViT pools by token/avg/map)"),
        (cfg.norm_eps != TIMM_NORM_EPS, f"LayerNorm eps {cfg.norm_eps:g} (timm's ViT uses {TIMM_NORM_EPS:g})"),
    ]
    return [what for bad, what in checks if bad]


def _timm_position(model: VisionTransformer) -> tuple[torch.Tensor | None, bool]:
    """timm's `pos_embed` tensor and no_embed_class. A fixed sin-cos table becomes a learned patches-only table.

    timm's pre-norm ViT has no patch-embedding bias (CLIP); vitkit's bias is added to every patch token before
    the position table, so it moves into the table's patch rows (a table of the bias alone when there is none).
    """
    cfg = model.cfg
    table = position_table(model, with_prefix=False)
    no_embed_class = cfg.no_embed_class or (cfg.pos_embed == "sincos2d" and cfg.num_prefix_tokens > 0)
    bias = model.patch_embed.proj.bias.detach()
    if cfg.pre_norm and bool(bias.any()):
        if table is None:
            table, no_embed_class = bias.expand(1, cfg.grid_size[0] * cfg.grid_size[1], -1), True
        else:
            first_patch = 0 if no_embed_class else cfg.num_prefix_tokens
            table = table.clone()
            table[:, first_patch:] += bias
    return table, no_embed_class


def timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm's names are vitkit's; only the position table (and a pre-norm model's patch bias) change form."""
    state = dict(model.state_dict())
    table, _ = _timm_position(model)
    if model.cfg.pre_norm:
        state.pop("patch_embed.proj.bias")
    if table is not None:
        state["pos_embed"] = table
    return state


def timm_model_args(model: VisionTransformer) -> dict[str, Any]:
    """Every VisionTransformer constructor argument that shapes the weights or the forward pass, in timm's names."""
    cfg = model.cfg
    table, no_embed_class = _timm_position(model)
    return {
        "img_size": list(cfg.img_size),
        "patch_size": cfg.patch_size[0] if cfg.patch_size[0] == cfg.patch_size[1] else list(cfg.patch_size),
        "in_chans": cfg.in_chans,
        "num_classes": cfg.num_classes,
        "global_pool": "" if cfg.global_pool == "none" else cfg.global_pool,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "qk_norm": cfg.qk_norm,
        "init_values": cfg.init_values,
        "class_token": cfg.class_token,
        "reg_tokens": cfg.reg_tokens,
        "pos_embed": "none" if table is None else "learn",
        "no_embed_class": no_embed_class,
        "pre_norm": cfg.pre_norm,
        "fc_norm": cfg.fc_norm,
        "dynamic_img_size": cfg.dynamic_img_size,
    }


def timm_pretrained_cfg(model: VisionTransformer) -> dict[str, Any]:
    """The preprocessing as timm's pretrained_cfg holds it (timm's eval transform is vitkit's: resize, crop)."""
    pre, cfg = model.preprocess, model.cfg
    return {
        "input_size": [cfg.in_chans, *pre.input_size],
        "fixed_input_size": not cfg.dynamic_img_size,
        "interpolation": pre.interpolation,
        "crop_pct": pre.crop_pct,
        "crop_mode": "center",
        "mean": channel_stats(pre.mean, cfg.in_chans),
        "std": channel_stats(pre.std, cfg.in_chans),
        "num_classes": cfg.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "custom_load": False,
    }


def timm_config(model: VisionTransformer) -> dict[str, Any]:
    """config.json as timm's save_for_hf writes it."""
    cfg = model.cfg
    conf: dict[str, Any] = {
        "architecture": timm_architecture(cfg),
        "num_classes": cfg.num_classes,
        "num_features": cfg.embed_dim,
        "global_pool": "" if cfg.global_pool == "none" else cfg.global_pool,
    }
    if model.labels:
        conf["label_names"] = list(model.labels)
    conf["model_args"] = timm_model_args(model)
    conf["pretrained_cfg"] = timm_pretrained_cfg(model)
    return conf


def write_timm_folder(model: VisionTransformer, directory: Path) -> Path:
    """config.json and model.safetensors in timm's Hub layout; ExportError names what timm cannot express."""
    unsupported("timm's VisionTransformer", timm_problems(model), "Save it with format='vitkit' instead")
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / WEIGHTS_FILE, timm_state_dict(model))
    write_json(directory / "config.json", timm_config(model))
    return directory


__all__ = [
    "is_timm_state",
    "convert_timm_state",
    "load_timm_file",
    "load_timm_hub_folder",
    "read_weights",
    "TIMM_PLAIN_VITS",
    "timm_architecture",
    "timm_problems",
    "timm_state_dict",
    "timm_model_args",
    "timm_pretrained_cfg",
    "timm_config",
    "write_timm_folder",
]
