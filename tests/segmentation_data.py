"""Synthetic segmentation data for the tests: coloured squares on noise, masks from the squares.

`shapes_scene` draws one picture and its mask; `write_segmentation_folder` writes a set in the images/ + masks/
layout `vitkit train --task segment` reads (with classes.txt). Every class is a colour (conftest's PALETTE), so a
model that learns anything segments them well above chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import PALETTE

SHAPE_CLASSES = ("background", "red", "green")


def shapes_scene(rng: np.random.Generator, size: int = 32, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size, 3) uint8, mask (size, size) uint8): 1 or 2 squares of classes 1.. on gray noise (class 0).

    Squares are drawn in PALETTE colours (class c in PALETTE[c - 1]) with a little noise; a later square covers
    an earlier one in both the image and the mask.
    """
    image = rng.integers(60, 190, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        c = int(rng.integers(1, classes))
        side = int(rng.integers(size // 4, size // 2 + 1))
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        colour = np.clip(np.array(PALETTE[c - 1]) + rng.integers(-20, 21, (side, side, 3)), 0, 255)
        image[top : top + side, left : left + side] = colour
        mask[top : top + side, left : left + side] = c
    return image, mask


def write_segmentation_folder(
    root: Path,
    n: int = 24,
    size: int = 32,
    classes: Sequence[str] = SHAPE_CLASSES,
    seed: int = 0,
    classes_txt: bool = True,
) -> Path:
    """root/images/<i>.png, root/masks/<i>.png (index PNGs), root/classes.txt; returns root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = shapes_scene(rng, size, len(classes))
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i:03d}.png")
    if classes_txt:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as written above: (H, W) uint8 class indices."""
    return np.asarray(Image.open(path), dtype=np.uint8)
