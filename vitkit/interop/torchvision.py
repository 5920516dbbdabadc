"""torchvision `VisionTransformer` state dicts (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, custom sizes).

torchvision keeps attention as `nn.MultiheadAttention`, whose fused `in_proj_weight` rows are [q; k; v] like
timm's `qkv`, so every tensor maps without reshaping. The head count is not stored: it comes from the
standard width table (768 -> 12, 1024 -> 16, 1280 -> 16) or from `num_heads=` for custom widths.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from .common import Converted, unwrap_state_dict
from .report import LoadReport

_RENAMES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
]


def is_torchvision_state(keys: set[str]) -> bool:
    return "conv_proj.weight" in keys and "encoder.pos_embedding" in keys


def convert_torchvision_state(state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for pattern, repl in _RENAMES:
            if re.fullmatch(pattern, k):
                dst = re.sub(pattern, repl, k)
                out[dst] = v
                report.map(k, dst)
                break
        else:  # e.g. heads.pre_logits (representation_size): vitkit has no such layer
            report.unmatched.append(f"{k} {tuple(v.shape)}")
    return out


def default_preprocess(img_size: int) -> PreprocessConfig:
    """torchvision's documented eval transforms: ImageNet mean/std; IMAGENET1K_V1 weights resize 256 -> crop 224
    bilinear; the larger SWAG weights (384 / 512 / 518 px) resize to the size itself, bicubic."""
    if img_size <= 224:
        return PreprocessConfig((img_size, img_size), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 224 / 256)
    return PreprocessConfig((img_size, img_size), IMAGENET_MEAN, IMAGENET_STD, "bicubic", 1.0)


def load_torchvision_state(path: Path, tensors: dict[str, Any]) -> Converted:
    report = LoadReport(str(path), "torchvision VisionTransformer")
    state = convert_torchvision_state(unwrap_state_dict(tensors, report), report)
    conv = Converted(state, report, hints=dict(norm_eps=1e-6, global_pool="token"))
    side = 224
    if "pos_embed" in state and "patch_embed.proj.weight" in state:
        side = math.isqrt(state["pos_embed"].shape[1] - 1) * state["patch_embed.proj.weight"].shape[-1]
    conv.preprocess = default_preprocess(side)
    report.note(
        "torchvision stores no preprocessing; its documented eval transform is used "
        f"({conv.preprocess.interpolation}, crop {conv.preprocess.crop_pct:.3f}, ImageNet mean/std)"
    )
    return conv


__all__ = ["is_torchvision_state", "convert_torchvision_state", "load_torchvision_state", "default_preprocess"]
