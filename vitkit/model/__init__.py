"""The Vision Transformer itself: config -> modules -> forward. Nothing here knows about files from other libraries."""

from __future__ import annotations

from typing import Any

from ..config import ViTConfig, config_from_name
from .loading import load_model
from .outputs import Intermediate, Intermediates
from .pos_embed import resample_pos_embed, sincos_2d
from .serialization import CheckpointError, save_model
from .vit import VisionTransformer


def create_model(
    name: str | ViTConfig = "vit_base_patch16_224", pretrained: bool = False, **overrides: Any
) -> VisionTransformer:
    """Build a randomly initialised ViT from a name (timm-style, big_vision "S/16", or a preset) or a config.

    Overrides use timm's constructor names, e.g. `create_model("vit_small_patch16_224", num_classes=10)`.
    Pretrained weights are `vitkit.create_model(..., pretrained=True)`: downloading belongs to vitkit.interop,
    which imports this package (never the reverse).
    """
    if pretrained:
        raise ValueError(
            "vitkit.model.create_model builds random weights; for pretrained=True call vitkit.create_model "
            f"({name!r}, pretrained=True) or vitkit.from_pretrained({name!r})"
        )
    cfg = name.replace(**overrides) if isinstance(name, ViTConfig) else config_from_name(name, **overrides)
    return VisionTransformer(cfg)


__all__ = [
    "create_model",
    "VisionTransformer",
    "Intermediate",
    "Intermediates",
    "resample_pos_embed",
    "sincos_2d",
    "save_model",
    "load_model",
    "CheckpointError",
]
