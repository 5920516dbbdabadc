"""Hugging Face transformers ViT: a folder with config.json and model.safetensors / pytorch_model.bin.

Reading: both `ViTModel` (keys at the top level, with a pooler) and `ViTForImageClassification` (`vit.` prefix
and a `classifier`) layouts, in transformers' saved names (`encoder.layer.N.attention.attention.query`) and the
in-memory names of transformers 5 (`layers.N.attention.q_proj`). Separate q/k/v projections are fused into
vitkit's one `qkv`. HF's LayerNorm eps (1e-12) travels in `norm_eps`.

Writing (`write_hf_folder`) is the reverse, in the saved names every transformers version reads: `qkv` split into
query/key/value, config.json with id2label, and a preprocessor_config.json that reproduces vitkit's resize and
center crop. transformers' ViT has no conv stem, registers, avg/MAP pooling, fc_norm, pre-norm or qk-norm; a model
with any of them is refused with one error naming them. LayerScale and fixed or patches-only position tables are
written as the equivalent plain ViT (folded gammas, zero rows for the class token).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..config import PreprocessConfig, to_2tuple
from ..model import VisionTransformer
from ..model.serialization import WEIGHTS_FILE, CheckpointError
from .common import Converted, unwrap_state_dict
from .report import LoadReport
from .timm import read_weights
from .writing import channel_stats, fold_layer_scale, position_table, unsupported, write_json, write_weights

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
    resized = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else None
    if resized and isinstance(crop, dict) and "height" in crop:
        pre.crop_pct = crop["height"] / resized  # resize (shorter edge, or to a fixed size), then center-crop
        if "shortest_edge" in size or image_size[0] != image_size[1]:
            return pre  # vitkit's own pipeline: it too resizes a non-square size to a fixed size
    elif (
        isinstance(size, dict)
        and "height" in size
        and "width" in size
        and (size["height"], size["width"]) != image_size
    ):
        report.note(f"processor size {size} differs from the model's {image_size}; the model's size is used")
    report.note(
        "HF resizes straight to the square size; vitkit keeps the aspect ratio and center-crops "
        f"(crop {pre.crop_pct:g})"
    )
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


# ------------------------------------------------------------------------------------------------ writing
PIL_RESAMPLE_CODES = {name: code for code, name in PIL_RESAMPLE.items()}
_TO_HF_BLOCK = {  # vitkit block module -> transformers' saved module, under encoder.layer.N.
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def hf_problems(model: VisionTransformer) -> list[str]:
    """What transformers' ViT (patch conv, class token, LN-blocks-LN, classifier on the class token) lacks."""
    cfg = model.cfg
    checks = [
        (cfg.stem != "patch", "the conv stem (stem='conv'; its ViT embeds patches with one strided conv)"),
        (not cfg.class_token, "no class token (class_token=False)"),
        (cfg.reg_tokens > 0, f"{cfg.reg_tokens} register tokens (reg_tokens)"),
        (cfg.global_pool != "token", f"global_pool={cfg.global_pool!r} (it pools the class token)"),
        (cfg.use_fc_norm, "fc_norm (a LayerNorm after pooling)"),
        (cfg.pre_norm, "pre_norm (a LayerNorm before the blocks)"),
        (cfg.qk_norm, "qk_norm (LayerNorm on queries and keys)"),
    ]
    return [what for bad, what in checks if bad]


def hf_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's weights in transformers' saved ViT names (`vit.` prefix and `classifier` when it has a head)."""
    cfg = model.cfg
    state = fold_layer_scale(model.state_dict(), cfg.depth)
    vit = "vit." if cfg.num_classes > 0 else ""  # ViTForImageClassification nests ViTModel under `vit`
    table = position_table(model, with_prefix=True)
    if table is None:  # transformers always adds a table: zeros add nothing
        table = torch.zeros(1, 1 + cfg.grid_size[0] * cfg.grid_size[1], cfg.embed_dim)
    out = {
        f"{vit}embeddings.cls_token": state["cls_token"],
        f"{vit}embeddings.position_embeddings": table,
        f"{vit}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{vit}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{vit}layernorm.weight": state["norm.weight"],
        f"{vit}layernorm.bias": state["norm.bias"],
    }
    for i in range(cfg.depth):
        layer = f"{vit}encoder.layer.{i}."
        for src, dst in _TO_HF_BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"{layer}{dst}.{kind}"] = state[f"blocks.{i}.{src}.{kind}"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)  # rows [q; k; v]
            for name, part in (("query", q), ("key", k), ("value", v)):
                out[f"{layer}attention.attention.{name}.{kind}"] = part
    if cfg.num_classes > 0:
        out["classifier.weight"] = state["head.weight"]
        out["classifier.bias"] = state["head.bias"]
    return out


def _size(pair: tuple[int, int]) -> int | list[int]:
    return pair[0] if pair[0] == pair[1] else list(pair)


def hf_config(model: VisionTransformer) -> dict[str, Any]:
    """transformers' ViTConfig as config.json holds it; id2label from the model's class names (LABEL_i without)."""
    cfg = model.cfg
    conf: dict[str, Any] = {
        "architectures": ["ViTForImageClassification" if cfg.num_classes > 0 else "ViTModel"],
        "model_type": "vit",
        "image_size": _size(cfg.img_size),
        "patch_size": _size(cfg.patch_size),
        "num_channels": cfg.in_chans,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio),
        "hidden_act": "gelu",  # exact GELU, as vitkit's MLP
        "layer_norm_eps": cfg.norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "encoder_stride": cfg.patch_size[0],
    }
    if cfg.num_classes > 0:
        names = model.labels or [f"LABEL_{i}" for i in range(cfg.num_classes)]  # transformers' placeholders
        conf["id2label"] = {str(i): name for i, name in enumerate(names)}
        conf["label2id"] = {name: i for i, name in enumerate(names)}
    return conf


def hf_preprocessor_config(model: VisionTransformer) -> dict[str, Any]:
    """vitkit's preprocessing as an image processor config.

    BitImageProcessor, not ViTImageProcessor: ViTImageProcessor squashes every image to the square size, while
    vitkit (as timm) resizes the shorter side to size / crop_pct and center-crops; BitImageProcessor does exactly
    that (transformers 4 and 5), and vitkit reads this file back to the same crop.
    """
    pre, C = model.preprocess, model.cfg.in_chans
    H, W = pre.input_size
    scaled = (math.floor(H / pre.crop_pct), math.floor(W / pre.crop_pct))
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": scaled[0]} if H == W else {"height": scaled[0], "width": scaled[1]},
        "resample": PIL_RESAMPLE_CODES[pre.interpolation],
        "do_center_crop": True,
        "crop_size": {"height": H, "width": W},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": channel_stats(pre.mean, C),
        "image_std": channel_stats(pre.std, C),
        "do_convert_rgb": C == 3,
    }


def write_hf_folder(model: VisionTransformer, directory: Path) -> Path:
    """config.json, preprocessor_config.json and model.safetensors, as transformers' save_pretrained lays them out.

    Load with `ViTForImageClassification.from_pretrained(directory)` (`ViTModel`, add_pooling_layer=False, for a
    model without a head). Raises ExportError naming every option transformers' ViT cannot express.
    """
    unsupported("transformers' ViT", hf_problems(model), "Save it with format='timm' or 'vitkit' instead")
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory / WEIGHTS_FILE, hf_state_dict(model))
    write_json(directory / "config.json", hf_config(model))
    write_json(directory / "preprocessor_config.json", hf_preprocessor_config(model))
    return directory


__all__ = [
    "is_hf_state",
    "convert_hf_state",
    "load_hf_folder",
    "load_hf_state_file",
    "hf_problems",
    "hf_state_dict",
    "hf_config",
    "hf_preprocessor_config",
    "write_hf_folder",
]
