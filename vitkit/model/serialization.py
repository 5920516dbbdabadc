"""vitkit's own checkpoint format: safetensors whose metadata carries config, preprocessing and labels.

A `.safetensors` written here is enough on its own to rebuild the model and to predict correctly.
The write is atomic (temp file, fsync, rename), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..config import PreprocessConfig, ViTConfig

FORMAT = "vitkit"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_metadata(model: Any, **extra: str) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_json(),
        "preprocess": json.dumps(model.preprocess.to_dict()),
    }
    if model.labels is not None:
        meta["labels"] = json.dumps(list(model.labels))
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_model(model: Any, path: str | Path, **extra: str) -> Path:
    """Save a VisionTransformer's weights (contiguous, CPU) with its metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, st_save(tensors, metadata=build_metadata(model, **extra)))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata ({} when none), with a clear error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {e}") from e


def is_vitkit_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        return read_metadata(p).get("format") == FORMAT
    except CheckpointError:
        return False


def parse_metadata(
    meta: dict[str, str], path: str | Path = "<memory>"
) -> tuple[ViTConfig, PreprocessConfig, list | None]:
    """Config, preprocessing and labels from vitkit metadata; every defect is a CheckpointError naming the file."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a vitkit checkpoint (metadata format={meta.get('format')!r})")
    try:
        cfg = ViTConfig.from_dict(json.loads(meta["config"]))
        pre = PreprocessConfig.from_dict(json.loads(meta.get("preprocess", "{}")))
        labels = json.loads(meta["labels"]) if "labels" in meta else None
    except KeyError as e:
        raise CheckpointError(f"'{path}': metadata lacks {e}") from e
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"'{path}': malformed metadata: {e}") from e
    if labels is not None and (not isinstance(labels, list) or len(labels) != cfg.num_classes):
        raise CheckpointError(f"'{path}': labels do not match num_classes={cfg.num_classes}")
    return cfg, pre, labels


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Rebuild a VisionTransformer from a vitkit safetensors file, checking every tensor's name and shape."""
    from .vit import VisionTransformer

    path = Path(path)
    cfg, pre, labels = parse_metadata(read_metadata(path), path)
    model = VisionTransformer(cfg, preprocess=pre, labels=labels)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(map_location)) as f:
        for k in f.keys():
            state[k] = f.get_tensor(k)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} {state[k].dtype}, model {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in state
        and (state[k].shape != v.shape or not state[k].dtype.is_floating_point == v.dtype.is_floating_point)
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"'{path}' does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape/dtype {wrong[:5]}"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()
