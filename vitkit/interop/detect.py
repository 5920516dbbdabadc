"""Which format a checkpoint path holds, decided from its contents (folder files, metadata, tensor names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..model.serialization import WEIGHTS_FILE, CheckpointError, is_vitkit_checkpoint
from .common import Converted
from .hf import is_hf_state, load_hf_folder, load_hf_state_file
from .jax_npz import load_npz
from .timm import is_timm_state, load_timm_file, load_timm_hub_folder, read_weights
from .torchvision import is_torchvision_state, load_torchvision_state

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def detect_format(path: str | Path) -> str:
    """One of 'vitkit', 'timm-hub', 'hf', 'npz', 'state-dict' (a file whose tensor names decide later)."""
    path = Path(path)
    if path.is_dir():
        if is_vitkit_checkpoint(path / WEIGHTS_FILE):  # save_pretrained(format="vitkit"); its config.json is a copy
            return "vitkit"
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"'{path}' is a folder without config.json; expected a timm or transformers folder")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"'{cfg_path}' is not readable JSON: {e}") from e
        if "architecture" in cfg:
            return "timm-hub"
        if cfg.get("model_type") == "vit" or any("ViT" in a for a in cfg.get("architectures", [])):
            return "hf"
        raise CheckpointError(
            f"'{cfg_path}' names neither a timm architecture ('architecture') nor a transformers ViT "
            f"(model_type 'vit'); found keys {sorted(cfg)[:8]}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors":
        return "vitkit" if is_vitkit_checkpoint(path) else "state-dict"
    if path.suffix in PICKLE_SUFFIXES:
        return "state-dict"
    raise CheckpointError(
        f"'{path}': unknown checkpoint type '{path.suffix}'; expected .safetensors, .npz, "
        f"{', '.join(PICKLE_SUFFIXES)}, or a timm / transformers folder"
    )


def load_foreign(path: str | Path, img_size: int | tuple[int, int] | None = None) -> Converted:
    """Read and translate any non-vitkit checkpoint into vitkit names (nothing built yet).

    img_size: the size asked for; only formats that compute (rather than store) a tensor use it.
    """
    path = Path(path)
    kind = detect_format(path)
    if kind == "timm-hub":
        return load_timm_hub_folder(path)
    if kind == "hf":
        return load_hf_folder(path)
    if kind == "npz":
        return load_npz(path, img_size)
    if kind == "vitkit":
        raise CheckpointError(f"'{path}' is a vitkit checkpoint; load it with from_pretrained")
    tensors: dict[str, Any] = read_weights(path)
    inner = tensors
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(inner.get(key), dict):
            inner = inner[key]
            break
    keys = {k.removeprefix("module.") for k in inner}
    if is_timm_state(keys):
        return load_timm_file(path, tensors)
    if is_torchvision_state(keys):
        return load_torchvision_state(path, tensors)
    if is_hf_state(keys):
        return load_hf_state_file(path, tensors)
    raise CheckpointError(
        f"'{path}': tensor names match no known ViT layout (timm 'patch_embed.proj.weight', torchvision "
        f"'conv_proj.weight', transformers '...patch_embeddings.projection.weight'); first names: {sorted(keys)[:6]}"
    )


__all__ = ["detect_format", "load_foreign"]
