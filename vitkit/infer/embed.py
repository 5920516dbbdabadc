"""Image embeddings from any checkpoint: the pooled vector the head would see, or the patch-token features.

The encoder is general-purpose: `forward_head(tokens, pre_logits=True)` is the representation a new head (or a
k-NN / logistic-regression probe) starts from. Images go through the checkpoint's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.decode import ImageDecodeError, decode_image
from ..data.preprocess import preprocess_image
from ..model import VisionTransformer
from .precision import autocast as precision_autocast
from .precision import check_precision, model_for
from .predict import Failure, _name_of, trim_extreme_aspect

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


@dataclass
class Embeddings:
    """The rows of the images that embedded, in input order, and the images that did not, each naming why."""

    features: np.ndarray  # float32 (M, D) pooled, or (M, h*w, D) patch features; one row per entry of `names`
    names: list[str]  # the images the rows belong to
    failures: list[Failure] = field(default_factory=list)  # the images that could not be decoded


def load_model(model: VisionTransformer | str | Path) -> VisionTransformer:
    """A loaded model as given, or a checkpoint (any format `from_pretrained` reads) loaded; in eval mode."""
    if not isinstance(model, VisionTransformer):
        from ..interop import from_pretrained

        model = from_pretrained(model)
    return model.eval()


def embed_all(
    model: VisionTransformer | str | Path,
    images: Sequence[str | Path | np.ndarray],
    names: Sequence[str] | None = None,
    patch: bool = False,
    batch_size: int = 64,
    precision: str = "bf16",
) -> Embeddings:
    """Embed images, skipping those that cannot be decoded (each becomes a Failure naming it, as `predict` does).

    Args:
        model: a VisionTransformer, or a checkpoint (any format `from_pretrained` reads).
        images: paths or (H, W, 3) uint8 arrays.
        names: how to call each image in the result (default: its path, or `<image i>` for an array).
        patch: patch-token features (M, h*w, D) instead of pooled ones (M, D).
        precision: "bf16" (fast on CPUs with AMX, ~3 significant digits), "fp32" or "int8" (infer/precision.py).
    """
    return _embed(model, images, names, patch, batch_size, precision, errors="collect")


def embed_images(
    model: VisionTransformer | str | Path,
    images: Sequence[str | Path | np.ndarray],
    patch: bool = False,
    batch_size: int = 64,
    precision: str = "bf16",
) -> np.ndarray:
    """Embed images with a model or checkpoint (any format `from_pretrained` reads); every image must decode.

    Args:
        images: paths or (H, W, 3) uint8 arrays; a file that cannot be decoded raises ImageDecodeError naming it
            (`embed_all` skips it instead).
        patch: return patch-token features (N, h*w, D) instead of pooled ones (N, D).
        precision: "bf16" (fast on CPUs with AMX, ~3 significant digits), "fp32" or "int8" (infer/precision.py).

    Returns:
        float32 array, one row per image in input order.
    """
    return _embed(model, images, None, patch, batch_size, precision, errors="raise").features


def _embed(
    model: VisionTransformer | str | Path,
    images: Sequence[str | Path | np.ndarray],
    names: Sequence[str] | None,
    patch: bool,
    batch_size: int,
    precision: str,
    errors: str,
) -> Embeddings:
    """Decode, preprocess and embed in batches; a bad image raises (errors="raise") or becomes a Failure."""
    check_precision(precision)
    model, bf16 = model_for(load_model(model), precision)
    device = next(model.parameters()).device
    pre, chans = model.preprocess, model.cfg.in_chans
    autocast = precision_autocast(device, bf16)
    names = list(names) if names is not None else [_name_of(im, i) for i, im in enumerate(images)]
    out = Embeddings(np.zeros(0, np.float32), [], [])
    pending: list[torch.Tensor] = []
    chunks: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            with autocast:
                chunks.append(embed_batch(model, torch.stack(pending).to(device), patch).float().cpu().numpy())
            pending.clear()

    for name, im in zip(names, images):
        try:
            rgb = im if isinstance(im, np.ndarray) else decode_image(im, name=name)
        except ImageDecodeError as e:
            if errors == "raise":
                raise
            out.failures.append(Failure(name, str(e)))
            continue
        pending.append(preprocess_image(trim_extreme_aspect(rgb, pre), pre, chans))  # (C, h, w)
        out.names.append(name)
        if len(pending) >= batch_size:
            flush()
    flush()
    out.features = np.concatenate(chunks) if chunks else np.zeros((0, *_feature_shape(model, patch)), np.float32)
    return out


def _feature_shape(model: VisionTransformer, patch: bool) -> tuple[int, ...]:
    """The shape of one image's features, for an empty result that still has the right number of dimensions."""
    gh, gw = model.cfg.grid_size
    return (gh * gw, model.cfg.embed_dim) if patch else (model.cfg.embed_dim,)


def embed_array(
    model: VisionTransformer, images: np.ndarray, patch: bool = False, batch_size: int = 256, precision: str = "bf16"
) -> np.ndarray:
    """Embed a dataset's uint8 image array (N, H, W, C) with the model's evaluation preprocessing.

    Returns float32 (N, D) pooled features (or (N, h*w, D) with patch=True), in the array's order.
    """
    from ..data.transforms import build_eval_transform

    model, bf16 = model_for(model.eval(), precision)
    device = next(model.parameters()).device
    tf = build_eval_transform(model.preprocess, model.cfg.in_chans)
    autocast = precision_autocast(device, bf16)
    chunks = []
    for start in range(0, len(images), batch_size):
        # a copy: the decode cache is a read-only memmap, and torch warns on tensors over non-writable memory
        x = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
        with autocast:
            feats = embed_batch(model, tf(x).to(device), patch)  # uint8 (B, C, H, W) -> float (B, C, h, w)
        chunks.append(feats.float().cpu().numpy())
    return np.concatenate(chunks)


__all__ = ["Embeddings", "embed_all", "embed_images", "embed_array", "embed_batch", "expand_image_paths", "load_model"]
