"""Segmentation at inference: class maps at each picture's own size, the palette mask PNG and the overlay.

`Segmenter` wraps a `Predictor` holding a segmentation checkpoint (its decoding, limits and backends: torch or
onnxruntime): a picture is resized whole to the model's input (no center crop, so every pixel gets a class),
the logits come back (B, K, h, w), are upsampled bilinearly to the picture's size, and the argmax is its mask.

The mask PNG is a palette image whose pixel values are the class indices (reading it back gives the mask, as a
training mask would be read) and whose palette shows each class in a distinct colour (PASCAL VOC's colour map, the
one most segmentation tools use). The overlay blends those colours over the picture and outlines the regions.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.decode import ImageDecodeError
from ..data.preprocess import normalize
from ..data.seg_transforms import resize_whole
from ..files import atomic_write_bytes
from ..tasks.segment import SegmentationPrediction, class_maps
from .predict import Failure, ImageInput, Predictor, _name_of


def voc_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: PASCAL VOC's colour map (class bits spread over the high bits of R, G and B), so neighbouring
    class indices get clearly different colours; class 0 is black."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


PALETTE = voc_palette()


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) uint8 class indices -> a palette PNG: pixel values are the indices, the palette colours them."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(PALETTE.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def region_edges(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another class (the outline of every region)."""
    edge = np.zeros(mask.shape, bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    return edge


def overlay_image(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 picture and its (H, W) mask -> the class colours blended over the picture, regions outlined
    in white: (H, W, 3) uint8."""
    colours = PALETTE[mask].astype(np.float32)
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colours
    out[region_edges(mask)] = 255.0
    return (out + 0.5).clip(0, 255).astype(np.uint8)


def segment_overlay_png(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> bytes:
    """overlay_image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(overlay_image(rgb, mask, alpha)).save(buf, format="PNG")
    return buf.getvalue()


class Segmenter:
    """Per-pixel class maps for pictures of any size, from a Predictor holding a segmentation model."""

    def __init__(self, predictor: Predictor):
        if getattr(predictor.task, "name", None) != "segment":
            name = getattr(predictor.task, "name", "classify")
            raise ValueError(f"'{predictor.checkpoint}' is a '{name}' model; segmentation needs a --task segment one")
        self.predictor = predictor

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> model input (C, h, w) float32: the whole picture resized to the input size."""
        p = self.predictor
        t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, H, W)
        return normalize(resize_whole(t, p.preprocess), p.preprocess, p.model.cfg.in_chans)

    def predictions(
        self, logits: torch.Tensor, names: Sequence[str], sizes: Sequence[tuple[int, int]]
    ) -> list[SegmentationPrediction]:
        """(B, K, h, w) logits -> one prediction per picture, its mask at its own (H, W)."""
        labels = self.predictor.labels
        return [
            SegmentationPrediction(name, mask, labels, conf)
            for name, (mask, conf) in zip(names, class_maps(logits, sizes))
        ]

    def segment(
        self,
        images: Sequence[ImageInput],
        names: Sequence[str] | None = None,
        batch_size: int = 8,
        errors: str = "raise",
    ) -> list[tuple[SegmentationPrediction, np.ndarray] | Failure]:
        """Segment many pictures in batches: per picture (its prediction, its decoded RGB (H, W, 3)) or a Failure.

        errors="raise": the first bad picture raises ImageDecodeError; "collect": it becomes a Failure in its place.
        """
        if errors not in ("raise", "collect"):
            raise ValueError("errors must be 'raise' or 'collect'")
        names = list(names) if names is not None else [_name_of(im, i) for i, im in enumerate(images)]
        results: list = [None] * len(images)
        pending: list[tuple[int, np.ndarray, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                logits = self.predictor.logits(torch.stack([x for _, _, x in pending]))  # (B, K, h, w)
                sizes = [rgb.shape[:2] for _, rgb, _ in pending]
                preds = self.predictions(logits, [names[i] for i, _, _ in pending], sizes)
                for (i, rgb, _), pred in zip(pending, preds):
                    results[i] = (pred, rgb)
                pending.clear()

        for i, image in enumerate(images):
            try:
                rgb = self.predictor.decode(image, names[i])
                pending.append((i, rgb, self.prepare(rgb)))
            except ImageDecodeError as e:
                if errors == "raise":
                    raise
                results[i] = Failure(names[i], str(e))
            if len(pending) >= batch_size:
                flush()
        flush()
        return results


def write_outputs(pred: SegmentationPrediction, rgb: np.ndarray, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<stem>.mask.png` (palette PNG of class indices) and `<stem>.overlay.png` into `out_dir` (created when
    missing), each atomically; returns their paths. The stem is the picture's file name without its suffix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(pred.image).stem or "image"
    mask_path = atomic_write_bytes(out / f"{stem}.mask.png", mask_png(pred.mask))
    overlay_path = atomic_write_bytes(out / f"{stem}.overlay.png", segment_overlay_png(rgb, pred.mask))
    return mask_path, overlay_path


__all__ = [
    "Segmenter",
    "write_outputs",
    "mask_png",
    "segment_overlay_png",
    "overlay_image",
    "voc_palette",
    "region_edges",
    "PALETTE",
]
