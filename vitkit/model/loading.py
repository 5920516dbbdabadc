"""Rebuild a VisionTransformer from a vitkit safetensors file.

The file format (metadata, limits, checks of the config) is vitkit.model.serialization's; this module joins it with
the model class, so that neither of those two needs to import the other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .serialization import (
    MAX_BUFFER_ELEMENTS,
    CheckpointError,
    apply_quantization,
    apply_task,
    parse_metadata,
    parse_quantization,
    parse_task,
    read_metadata,
    unbuilt_head_hint,
)
from .vit import VisionTransformer


def _is_float_dtype(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith(("F", "BF"))  # F16, F32, F64, BF16, F8_*


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> VisionTransformer:
    """Rebuild a VisionTransformer from a vitkit safetensors file, checking every tensor's name and shape.

    The config is checked against the file's tensor shapes on the meta device first, so a file cannot make us
    allocate more memory than its own tensors take.
    """
    path = Path(path)
    meta = read_metadata(path)
    cfg, pre, labels = parse_metadata(meta, path)
    task = parse_task(meta, path)  # a task with its own head (segmentation) rebuilds it before the weights load
    quantization = parse_quantization(meta, path)  # an int8 model (vitkit.quant): its int8 layers, likewise
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            file_specs = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {e}") from None
    with torch.device("meta"):
        skeleton = VisionTransformer(cfg, preprocess=pre, labels=labels)  # (no memory: shapes only)
        apply_task(skeleton, task)
        apply_quantization(skeleton, quantization, path)
    saved = skeleton.state_dict().keys()  # persistent buffers (int8 weights) are the file's own tensors, checked below
    buffer_elements = sum(b.numel() for name, b in skeleton.named_buffers() if name not in saved)
    if buffer_elements > MAX_BUFFER_ELEMENTS:
        raise CheckpointError(f"'{path}': its config needs {buffer_elements:,} buffer elements; refused")
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(file_specs))
    unexpected = sorted(set(file_specs) - set(expected))
    wrong = [
        f"{k}: file {file_specs[k][0]} {file_specs[k][1]}, model {shape} {dtype}"
        for k, (shape, dtype) in expected.items()
        if k in file_specs
        and (file_specs[k][0] != shape or _is_float_dtype(file_specs[k][1]) != dtype.is_floating_point)
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"'{path}' does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape/dtype {wrong[:5]}{unbuilt_head_hint(task)}"
        )
    model = VisionTransformer(cfg, preprocess=pre, labels=labels)
    apply_task(model, task)
    apply_quantization(model, quantization, path)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            for k in f.keys():
                state[k] = f.get_tensor(k).to(expected[k][1])
    except Exception as e:  # e.g. a file truncated after its header
        raise CheckpointError(f"'{path}': tensor data could not be read ({e}); the file is damaged") from None
    model.load_state_dict(state)
    return model.eval()


__all__ = ["load_model"]
