"""Tiny streamed data sets for the streaming tests: WebDataset shards written by the `webdataset` package itself,
whose every image says which sample it is, and a crop that keeps images whole so tests can read them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .conftest import png_bytes

SIDE = 8  # every image is SIDE x SIDE: whole images stack into batches


def sample_image(i: int) -> np.ndarray:
    """Image of sample i: pixel (0, 0) holds i % 256 and (0, 1) i // 256 (lossless PNG: read back exactly)."""
    rgb = np.random.RandomState(i).randint(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    rgb[0, 0, :], rgb[0, 1, :] = i % 256, i // 256
    return rgb


def sample_ids(x: torch.Tensor) -> list[int]:
    """The sample numbers of a batch of whole images (B, 3, SIDE, SIDE) made by `sample_image`."""
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()


def write_wds_shards(folder: Path, shards: int, per_shard: int, classes: int = 3, name: str = "train") -> str:
    """`shards` tar files of `per_shard` samples (key, png, cls = id % classes) written by webdataset.TarWriter;
    returns the brace pattern naming them."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{name}-{s:06d}.tar")) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                sink.write({"__key__": f"{i:06d}", "png": png_bytes(sample_image(i)), "cls": i % classes})
    return str(folder / f"{name}-{{{0:06d}..{shards - 1:06d}}}.tar")


class Whole:
    """A per-sample op that keeps the decoded image as it is (the streaming loaders' `op`)."""

    size = (SIDE, SIDE)

    def __call__(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        return img
