"""Loading weights from anywhere: vitkit's own safetensors and (one module each) foreign formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..model import VisionTransformer
from ..model.serialization import CheckpointError, is_vitkit_checkpoint, load_model


def from_pretrained(source: str | Path, **overrides: Any) -> VisionTransformer:
    """Load a model from a checkpoint file or folder, detecting its format.

    Overrides (timm names) are applied after loading: `num_classes` replaces the head, `img_size` resamples the
    position embedding.
    """
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{source}' does not exist")
    if is_vitkit_checkpoint(path):
        model = load_model(path)
    else:
        raise CheckpointError(f"'{source}': not a vitkit checkpoint and no other format recognised")
    return apply_overrides(model, **overrides)


def apply_overrides(model: VisionTransformer, **overrides: Any) -> VisionTransformer:
    """Adapt a loaded model: a new class count replaces the head, a new image size resamples positions."""
    from ..model.pos_embed import resample_pos_embed

    num_classes = overrides.pop("num_classes", None)
    global_pool = overrides.pop("global_pool", None)
    img_size = overrides.pop("img_size", None)
    if img_size is not None:
        cfg = model.cfg.replace(img_size=img_size)
        if cfg.img_size != model.cfg.img_size:
            state = model.state_dict()
            if model.cfg.pos_embed == "learn":
                prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
                state["pos_embed"] = resample_pos_embed(state["pos_embed"], cfg.grid_size, model.cfg.grid_size, prefix)
            pre = model.preprocess
            pre.input_size = cfg.img_size
            new = VisionTransformer(cfg, preprocess=pre, labels=model.labels)
            new.load_state_dict(state)
            model = new
    if overrides:
        # options that do not change any tensor shape (dropout, drop path, backend, dynamic size)
        cfg = model.cfg.replace(**overrides)
        new = VisionTransformer(cfg, preprocess=model.preprocess, labels=model.labels)
        new.load_state_dict(model.state_dict())
        model = new
    if (num_classes is not None and num_classes != model.cfg.num_classes) or global_pool is not None:
        model.reset_classifier(model.cfg.num_classes if num_classes is None else num_classes, global_pool)
    return model


__all__ = ["from_pretrained", "apply_overrides"]
