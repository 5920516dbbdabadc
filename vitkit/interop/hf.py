"""Hugging Face transformers ViT: a folder with config.json and model.safetensors / pytorch_model.bin.

Both `ViTModel` (keys at the top level, with a pooler) and `ViTForImageClassification` (`vit.` prefix and
a `classifier`) layouts, in transformers' saved names (`encoder.layer.N.attention.attention.query`) and the
in-memory names of transformers 5 (`layers.N.attention.q_proj`). Separate q/k/v projections are fused into
vitkit's one `qkv`. HF's LayerNorm eps (1e-12) travels in `norm_eps`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import PreprocessConfig, to_2tuple
from ..model.serialization import CheckpointError
from .common import Converted, unwrap_state_dict
from .report import LoadReport
from .timm import read_weights

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values

# (pattern on the key without the "vit." prefix, vitkit name); \1 is the layer index
_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (
        r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)",
        r"blocks.\1.attn.proj.\2",
    ),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
_QKV = re.compile(
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)"
)


def is_hf_state(keys: set[str]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys)


def convert_hf_state(state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """HF ViT names -> vitkit names; q, k, v fused in that order into qkv (rows: [q; k; v])."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}  # (layer, weight|bias) -> {q|k|v: ...}
    for k, v in state.items():
        name = k[len("vit.") :] if k.startswith("vit.") else k
        if m := _QKV.fullmatch(name):
            which = (m.group(2) or m.group(3))[0]  # query -> q
            qkv.setdefault((m.group(1), m.group(4)), {})[which] = (k, v)
            continue
        if name.startswith("pooler."):
            report.ignore(k, "ViTModel pooler (dense + tanh on the cls token): not on the classification path")
            continue
        if name == "embeddings.mask_token":
            report.ignore(k, "mask token: used only for masked image modelling")
            continue
        for pattern, repl in _RENAMES:
            if re.fullmatch(pattern, name):
                dst = re.sub(pattern, repl, name)
                out[dst] = v
                report.map(k, dst)
                break
        else:
            report.unmatched.append(f"{k} {tuple(v.shape)}")
    for (layer, kind), parts in sorted(qkv.items()):
        dst = f"blocks.{layer}.attn.qkv.{kind}"
        if set(parts) != {"q", "k", "v"}:
            report.unmatched.extend(name for name, _ in parts.values())
            report.missing.append(f"{dst} (needs query, key and value; found {sorted(parts)})")
            continue
        out[dst] = torch.cat([parts[c][1] for c in "qkv"], dim=0)  # (3D, D) or (3D,)
        report.reshape("+".join(parts[c][0] for c in "qkv"), dst, tuple(parts["q"][1].shape), tuple(out[dst].shape))
    return out


def _preprocess(folder: Path, image_size: tuple[int, int], report: LoadReport) -> PreprocessConfig:
    """From preprocessor_config.json; ViTImageProcessor's defaults otherwise (0.5/0.5, bilinear, no crop)."""
    pre = PreprocessConfig(input_size=image_size, interpolation="bilinear", crop_pct=1.0)
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        report.note("no preprocessor_config.json; ViTImageProcessor defaults used (mean/std 0.5, bilinear, resize)")
        return pre
    try:
        pc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}' is not readable JSON: {e}") from e
    if "image_mean" in pc:
        pre.mean = tuple(float(x) for x in pc["image_mean"])
    if "image_std" in pc:
        pre.std = tuple(float(x) for x in pc["image_std"])
    resample = pc.get("resample", 2)
    pre.interpolation = PIL_RESAMPLE.get(resample, "bilinear")
    size = pc.get("size", {})
    crop = pc.get("crop_size") if pc.get("do_center_crop") else None
    if isinstance(size, dict) and "shortest_edge" in size and isinstance(crop, dict) and "height" in crop:
        pre.crop_pct = crop["height"] / size["shortest_edge"]  # resize shorter edge, then crop
    elif (
        isinstance(size, dict)
        and "height" in size
        and "width" in size
        and (size["height"], size["width"]) != image_size
    ):
        report.note(f"processor size {size} differs from the model's {image_size}; the model's size is used")
    report.note("HF resizes straight to the square size; vitkit keeps the aspect ratio and center-crops (crop 1.0)")
    return pre


def load_hf_folder(folder: Path) -> Converted:
    """A transformers ViT folder: config.json (+ preprocessor_config.json) and the weights."""
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{cfg_path}' is not readable JSON: {e}") from e
    if cfg.get("model_type") not in (None, "vit"):
        raise CheckpointError(f"'{cfg_path}': model_type {cfg.get('model_type')!r} is not a plain ViT ('vit')")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"'{cfg_path}': hidden_act {act!r} is not supported (vitkit's MLP uses exact GELU)")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"'{folder}': no weights file found (looked for {', '.join(WEIGHT_FILES)})")
    report = LoadReport(str(folder), "Hugging Face transformers ViT")
    conv = Converted(convert_hf_state(unwrap_state_dict(read_weights(weights), report), report), report)
    image_size = to_2tuple(cfg.get("image_size", 224))
    conv.hints = dict(
        num_heads=int(cfg.get("num_attention_heads", 12)),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        img_size=image_size,
        global_pool="token",
    )
    report.note(f"LayerNorm eps {conv.hints['norm_eps']:g} from config.json (timm uses 1e-6)")
    conv.preprocess = _preprocess(folder, image_size, report)
    id2label: dict[str, Any] = cfg.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]  # type: ignore[call-overload]
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:  # LABEL_i are transformers' placeholders
        conv.labels = names
    return conv


def load_hf_state_file(path: Path, tensors: dict[str, Any]) -> Converted:
    """A bare HF ViT state dict without its config.json: heads from the width table, HF's eps 1e-12."""
    report = LoadReport(str(path), "Hugging Face transformers ViT (state dict only)")
    conv = Converted(convert_hf_state(unwrap_state_dict(tensors, report), report), report)
    conv.hints = dict(norm_eps=1e-12, global_pool="token")
    conv.preprocess = PreprocessConfig(interpolation="bilinear", crop_pct=1.0)
    report.note("no config.json: LayerNorm eps 1e-12 and ViTImageProcessor defaults assumed")
    return conv


__all__ = ["is_hf_state", "convert_hf_state", "load_hf_folder", "load_hf_state_file"]
