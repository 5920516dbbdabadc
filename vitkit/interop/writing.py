"""What the foreign-format writers share: the files they write and the rewrites that keep a model's function.

A foreign format may lack a vitkit option and still express the same function: a fixed sin-cos table or a
patches-only table is a learned table with zero rows for the tokens that get none; LayerScale is a per-channel
factor that folds into the linear layer before it. The writers use these rewrites and refuse only what no
rewrite expresses (`unsupported` builds the one error that names all of it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ..files import atomic_write_bytes
from ..model import VisionTransformer
from ..model.serialization import ExportError

# transformers and timm mark their safetensors files this way; no vitkit metadata, so the folder's config.json
# (the peer library's own record) is the one description of the model that readers follow
PEER_METADATA = {"format": "pt"}


def write_json(path: Path, obj: dict[str, Any]) -> Path:
    """Indented JSON, written atomically (a crash never leaves half a config beside whole weights)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def write_weights(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A plain safetensors file of contiguous CPU tensors, written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return atomic_write_bytes(path, st_save(tensors, metadata=PEER_METADATA))


def unsupported(target: str, problems: list[str], hint: str) -> None:
    """Raise the one error naming everything `target` cannot express; nothing when `problems` is empty."""
    if problems:
        raise ExportError(f"{target} cannot express this model: {'; '.join(problems)}. {hint}")


def position_table(model: VisionTransformer, with_prefix: bool) -> torch.Tensor | None:
    """The position embedding as a learned table would hold it: (1, L, D), or None when the model has none.

    with_prefix: the target's table has rows for the prefix (cls, register) tokens; they are zero where vitkit
    gives those tokens no position (no_embed_class, sin-cos), which adds the same nothing.
    """
    cfg = model.cfg
    if model.pos_embed is None:
        return None
    table = model.pos_embed.detach()  # (1, h*w, D) for sin-cos and no_embed_class, else (1, prefix + h*w, D)
    covers_prefix = cfg.pos_embed == "learn" and not cfg.no_embed_class
    if with_prefix and not covers_prefix and cfg.num_prefix_tokens:
        zeros = table.new_zeros(1, cfg.num_prefix_tokens, table.shape[-1])
        table = torch.cat([zeros, table], dim=1)
    return table


def fold_layer_scale(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """LayerScale (x * gamma after attention and MLP) folded into attn.proj and mlp.fc2: the same function,
    for formats without LayerScale. Returns a new dict without the `ls*.gamma` tensors."""
    out = dict(state)
    for i in range(depth):
        for ls, linear in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
            gamma = out.pop(f"blocks.{i}.{ls}.gamma", None)
            if gamma is None:
                continue
            out[f"blocks.{i}.{linear}.weight"] = out[f"blocks.{i}.{linear}.weight"] * gamma[:, None]
            out[f"blocks.{i}.{linear}.bias"] = out[f"blocks.{i}.{linear}.bias"] * gamma
    return out


def channel_stats(values: tuple[float, ...], in_chans: int) -> list[float]:
    """Mean or std with one value per input channel (vitkit averages RGB statistics for other channel counts)."""
    if len(values) == in_chans:
        return [float(v) for v in values]
    return [float(sum(values) / len(values))] * in_chans


__all__ = [
    "PEER_METADATA",
    "write_json",
    "write_weights",
    "unsupported",
    "position_table",
    "fold_layer_scale",
    "channel_stats",
]
