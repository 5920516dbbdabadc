"""Inference preprocessing from a checkpoint's PreprocessConfig: resize, center-crop, normalise.

The same function serves predict, evaluate, explain and the HTTP service, so a model sees the pixels it was
trained for wherever it runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..config import PreprocessConfig

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return _INTERP[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; use one of {sorted(_INTERP)}") from None


def to_device(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """`t` on `device` without stalling the host: a copy from pageable CPU memory to a GPU waits until the GPU's
    queue has drained (a hidden host sync per call); a copy from pinned memory is queued like a kernel."""
    if device is None or t.device == torch.device(device):
        return t
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()  # the host allocator keeps the block until the queued copy has read it
    return t.to(device, non_blocking=True)


def resize_and_crop(img: torch.Tensor, pre: PreprocessConfig) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, h, w) at pre.input_size: scale by 1/crop_pct, then center-crop (timm's eval)."""
    h, w = pre.input_size
    mode = interpolation_mode(pre.interpolation)
    if h == w:  # square target: shorter side to size / crop_pct keeps the aspect ratio
        img = TF.resize(img, [math.floor(h / pre.crop_pct)], interpolation=mode, antialias=True)
    else:
        size = [math.floor(h / pre.crop_pct), math.floor(w / pre.crop_pct)]
        img = TF.resize(img, size, interpolation=mode, antialias=True)
    return TF.center_crop(img, [h, w])


def normalize(img: torch.Tensor, pre: PreprocessConfig, in_chans: int = 3) -> torch.Tensor:
    """uint8 (..., C, h, w) -> float32 normalised; RGB becomes one channel for single-channel models."""
    x = img.float() / 255.0
    if in_chans == 1 and x.shape[-3] == 3:
        luma = to_device(torch.tensor([0.299, 0.587, 0.114]), x.device)
        x = (x * luma.view(3, 1, 1)).sum(dim=-3, keepdim=True)
    # made on the CPU and moved with to_device: torch.tensor(list, device="cuda") is a pageable copy (a host sync)
    mean = to_device(torch.tensor(pre.mean, dtype=torch.float32), x.device).view(-1, 1, 1)
    std = to_device(torch.tensor(pre.std, dtype=torch.float32), x.device).view(-1, 1, 1)
    if mean.shape[0] != x.shape[-3]:  # e.g. RGB statistics on a 1-channel model: use their average
        mean, std = mean.mean().view(1, 1, 1), std.mean().view(1, 1, 1)
    return (x - mean) / std


def preprocess_image(rgb: np.ndarray | torch.Tensor, pre: PreprocessConfig, in_chans: int = 3) -> torch.Tensor:
    """(H, W, 3) uint8 array (as decode_image gives) -> model input (C, h, w) float32."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1) if isinstance(rgb, np.ndarray) else rgb
    return normalize(resize_and_crop(t, pre), pre, in_chans)
