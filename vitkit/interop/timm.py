"""timm checkpoints: a plain state dict (.pth / .bin / .safetensors) or a folder as timm saves for the HF Hub.

vitkit uses timm's module names, so tensors map 1:1; what a state dict cannot say (head count, image size,
preprocessing, labels) comes from the folder's config.json (`architecture`, `model_args`, `pretrained_cfg`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import PreprocessConfig, config_from_name, field_names, to_2tuple
from ..model.serialization import CheckpointError
from .common import Converted, read_safetensors, read_torch_file, unwrap_state_dict
from .report import LoadReport

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


__all__ = ["is_timm_state", "convert_timm_state", "load_timm_file", "load_timm_hub_folder", "read_weights"]
