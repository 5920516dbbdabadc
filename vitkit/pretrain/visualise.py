"""See a masked autoencoder learn: original / masked / reconstructed images of a fixed set, as one PNG.

The same images (a seeded pick of the held-out ones, else of the training ones) with the same masks at every
drawing, so the PNGs of one run compare. With the normalised-pixel loss the model predicts each hidden patch's
pattern but not its mean colour and contrast; the reconstruction row borrows those from the original (as MAE's own
demo does), so a fourth row shows the prediction alone: each hidden patch drawn around mid-grey, flat early on and
carrying the edges and colour shifts of the image once the model has learnt them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..config import PreprocessConfig
from ..data.transforms import build_eval_transform
from ..files import atomic_write_bytes
from ..train.build import RunData
from .mae import MaskedAutoencoder, patchify, unpatchify

RECONSTRUCTION_FILE = "reconstruction.png"
ROWS = ("original", "masked", "reconstruction", "prediction alone")
DETAIL_SCALE = 0.2  # "prediction alone": a hidden patch is 0.5 + this x its normalised prediction (in [0, 1] units)
MASK_COLOUR = (70, 90, 140)  # hidden patches in the "masked" row: a muted blue, told apart from grey pixels
CELL_MIN_SIDE = 96  # small images are scaled up (nearest neighbour: patches stay crisp) to at least this side
LABEL_WIDTH = 110  # px left of the grid for the row names
TITLE_HEIGHT = 18


def preview_images(data: RunData, seed: int, count: int = 8) -> np.ndarray:
    """`count` images (n, H, W, C) uint8, picked with `seed` from the held-out images, else the training ones."""
    ds, idx = (
        (data.val_ds, data.val_idx) if data.val_ds is not None and len(data.val_idx) else (data.ds, data.train_idx)
    )
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(idx), size=min(count, len(idx)), replace=False))
    return np.asarray(ds.images[np.sort(idx[pick])])


def _unit_pixels(x: torch.Tensor, pre: PreprocessConfig) -> torch.Tensor:
    """Model input (B, C, h, w), normalised by `pre` -> pixels in [0, 1] (B, C, h, w) on the CPU."""
    C = x.shape[1]
    mean, std = torch.tensor(pre.mean, dtype=torch.float32), torch.tensor(pre.std, dtype=torch.float32)
    if mean.shape[0] != C:  # RGB statistics on a 1-channel model: `normalize` used their average too
        mean, std = mean.mean().view(1), std.mean().view(1)
    return (x.float().cpu() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)


def _rgb(pixels: torch.Tensor) -> np.ndarray:
    """Pixels in [0, 1] (B, C, h, w) -> (B, h, w, 3) uint8 for display (one channel shown as grey)."""
    out = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, h, w, C)
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def _hide(images: np.ndarray, hidden: torch.Tensor, patch_size: tuple[int, int]) -> np.ndarray:
    """`images` (B, h, w, 3) with the hidden patches (B, N) painted MASK_COLOUR."""
    B, h, w, _ = images.shape
    ph, pw = patch_size
    grid = hidden.cpu().reshape(B, h // ph, w // pw).numpy()
    pixel_mask = grid.repeat(ph, axis=1).repeat(pw, axis=2)  # (B, h, w)
    out = images.copy()
    out[pixel_mask] = MASK_COLOUR
    return out


def reconstruction_rows(
    mae: MaskedAutoencoder, images: np.ndarray, pre: PreprocessConfig, seed: int = 0
) -> list[np.ndarray]:
    """The rows of the figure, each (n, h, w, 3) uint8: original, masked, reconstruction, and with the
    normalised-pixel loss the prediction alone (see the module docstring).

    Runs `mae` in eval mode in fp32 on its own device, with masks from a generator seeded by `seed` (torch's
    global generator is not drawn); the model's training mode is restored after.
    """
    device = next(mae.parameters()).device
    x = build_eval_transform(pre, mae.chans)(torch.from_numpy(images).permute(0, 3, 1, 2))  # (n, C, h, w)
    was_training = mae.training
    mae.eval()
    try:
        recon, hidden, raw = mae.reconstruct(x.to(device), torch.Generator().manual_seed(seed))
    finally:
        mae.train(was_training)
    unit = _unit_pixels(x, pre)
    original = _rgb(unit)
    rows = [original, _hide(original, hidden, mae.patch_size), _rgb(_unit_pixels(recon, pre))]
    if mae.norm_pix_loss:
        hidden, raw = hidden.cpu().unsqueeze(-1), raw.cpu()
        patches = torch.where(hidden, 0.5 + DETAIL_SCALE * raw, patchify(unit, mae.patch_size))  # (n, N, P)
        rows.append(_rgb(unpatchify(patches, mae.patch_size, mae.grid, mae.chans)))
    return rows


def compose_grid(rows: list[np.ndarray], title: str = "") -> Image.Image:
    """One image: a row per entry of `rows` (named by ROWS), a column per image, scaled up to be seen."""
    n, h, w, _ = rows[0].shape
    scale = max(1, -(-CELL_MIN_SIDE // min(h, w)))  # ceil: the smaller side reaches CELL_MIN_SIDE
    ch, cw, gap = h * scale, w * scale, 4
    canvas = Image.new("RGB", (LABEL_WIDTH + n * (cw + gap), TITLE_HEIGHT + len(rows) * (ch + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black")
    for r, (name, row) in enumerate(zip(ROWS, rows)):
        top = TITLE_HEIGHT + r * (ch + gap)
        draw.text((4, top + ch // 2 - 6), name, fill="black")
        for c, img in enumerate(row):
            cell = Image.fromarray(img).resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(cell, (LABEL_WIDTH + c * (cw + gap), top))
    return canvas


def save_reconstructions(
    mae: MaskedAutoencoder, images: np.ndarray, path: str | Path, seed: int = 0, title: str = ""
) -> Path:
    """Draw original / masked / reconstruction of `images` (n, H, W, C) uint8 and write the PNG atomically."""
    grid = compose_grid(reconstruction_rows(mae, images, mae.encoder.preprocess, seed), title)
    buf = io.BytesIO()
    grid.save(buf, "PNG")
    return atomic_write_bytes(Path(path), buf.getvalue())
