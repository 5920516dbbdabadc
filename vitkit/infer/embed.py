"""Image embeddings from any checkpoint: the pooled vector the head would see, or the patch-token features.

The encoder is general-purpose: `forward_head(tokens, pre_logits=True)` is the representation a new head (or a
k-NN / logistic-regression probe) starts from. Images go through the checkpoint's own preprocessing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.decode import decode_image
from ..data.preprocess import preprocess_image
from ..model import VisionTransformer
from .predict import trim_extreme_aspect

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def expand_image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders become their image files (recursively, sorted) so that row order is stable."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image '{item}' does not exist")
    if not out:
        raise ValueError(f"no images found in {list(map(str, inputs))[:5]}")
    return out


@torch.no_grad()
def embed_batch(model: VisionTransformer, x: torch.Tensor, patch: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> pooled features (B, D), or patch features (B, h*w, D) with patch=True."""
    tokens = model.forward_features(x)  # (B, N, D), after the final norm
    if patch:
        return tokens[:, model.num_prefix_tokens :]  # (B, h*w, D)
    return model.forward_head(tokens, pre_logits=True)  # (B, D)


def embed_images(
    model: VisionTransformer | str | Path,
    images: Sequence[str | Path | np.ndarray],
    patch: bool = False,
    batch_size: int = 64,
    precision: str = "bf16",
) -> np.ndarray:
    """Embed images with a model or checkpoint (any format `from_pretrained` reads).

    Args:
        images: paths or (H, W, 3) uint8 arrays; a file that cannot be decoded raises ImageDecodeError naming it.
        patch: return patch-token features (N, h*w, D) instead of pooled ones (N, D).
        precision: "bf16" (fast on CPUs with AMX, ~3 significant digits) or "fp32".

    Returns:
        float32 array, one row per image in input order.
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if not isinstance(model, VisionTransformer):
        from ..interop import from_pretrained

        model = from_pretrained(model)
    model = model.eval()
    device = next(model.parameters()).device
    pre, chans = model.preprocess, model.cfg.in_chans
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = []
        for im in images[start : start + batch_size]:
            rgb = im if isinstance(im, np.ndarray) else decode_image(im, name=str(im))
            batch.append(preprocess_image(trim_extreme_aspect(rgb, pre), pre, chans))  # (C, h, w)
        with autocast:
            feats = embed_batch(model, torch.stack(batch).to(device), patch)
        chunks.append(feats.float().cpu().numpy())
    return np.concatenate(chunks)


def embed_array(
    model: VisionTransformer, images: np.ndarray, patch: bool = False, batch_size: int = 256, precision: str = "bf16"
) -> np.ndarray:
    """Embed a dataset's uint8 image array (N, H, W, C) with the model's evaluation preprocessing.

    Returns float32 (N, D) pooled features (or (N, h*w, D) with patch=True), in the array's order.
    """
    from ..data.transforms import build_eval_transform

    model = model.eval()
    device = next(model.parameters()).device
    tf = build_eval_transform(model.preprocess, model.cfg.in_chans)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        with autocast:
            feats = embed_batch(model, tf(x).to(device), patch)  # uint8 (B, C, H, W) -> float (B, C, h, w)
        chunks.append(feats.float().cpu().numpy())
    return np.concatenate(chunks)


__all__ = ["embed_images", "embed_array", "embed_batch", "expand_image_paths"]
