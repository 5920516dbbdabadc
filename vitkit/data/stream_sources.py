"""Open `--data` as a StreamSource, and decide whether a source streams or goes through the decode cache.

Every source but the built-in sets can stream: tar shards (read in order), image folders, CSVs and Hugging Face
datasets (read row by row), and an ImageFolder tar (read in order, as one shard). The decode cache is the faster
path while it fits (later epochs never decode), so it stays the default for small data: a source streams when its
decoded array would pass the cache limit, `VITKIT_CACHE_LIMIT` (default 16 GiB; e.g. `VITKIT_CACHE_LIMIT=4GB`).
The limit is a fixed number rather than a share of this machine's memory, so a run resumed on another machine
reads its data the same way.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .hf_datasets import is_hf_spec, open_hf
from .listing import DataSourceError
from .shards import expand_shards, is_shard_pattern, iter_samples, load_shard_index
from .sources import _BUILTINS, _csv_listing, _folder_listing, _is_tar, default_cache_dir
from .streaming import StreamSource, align_stream_classes

CACHE_LIMIT_ENV = "VITKIT_CACHE_LIMIT"
DEFAULT_CACHE_LIMIT = 16 * 2**30
SIZE_PROBES = 16  # images whose headers are read to estimate the decoded size

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """`1GB`, `500MB`, `1.5GiB`, `2e9` or a plain byte count -> bytes.

    Raises:
        ValueError: not a positive size with a known unit.
    """
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"'{text}' is not a size; write e.g. 1GB, 500MB or 2GiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"'{text}' is not a positive size")
    return size


def format_size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def cache_limit() -> int:
    """Decoded bytes above which a source streams instead of being cached: `$VITKIT_CACHE_LIMIT` or 16 GiB."""
    env = os.environ.get(CACHE_LIMIT_ENV)
    if not env:
        return DEFAULT_CACHE_LIMIT
    try:
        return parse_size(env)
    except ValueError as e:
        raise ValueError(f"{CACHE_LIMIT_ENV}: {e}") from None


def can_stream(spec: str) -> bool:
    """Whether `spec` names data that can stream (everything but the built-in sets)."""
    return spec.strip().lower().split(":")[0] not in _BUILTINS or Path(spec).expanduser().exists()


@dataclass
class _FileRows:
    """Row i of a folder or CSV: (its name, its file)."""

    files: list[tuple[str, Path]]

    def __call__(self, i: int) -> tuple[str, Path]:
        return self.files[i]


def _labelled_rows(listing, where: str) -> StreamSource:
    files = list(listing.stream)
    labels, classes = listing.label()
    keep = [i for i, lab in enumerate(labels) if lab is not None]  # images above the class folders are no samples
    rows = [files[i] for i in keep]
    if not rows:
        raise DataSourceError(f"{where}: no labelled images")
    labels = np.asarray([labels[i] for i in keep], dtype=np.int64)
    return StreamSource(labels, list(classes), listing.description, read=_FileRows(rows))


def open_stream_source(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    classes: Sequence[str] | None = None,
) -> StreamSource:
    """`--data spec` as a StreamSource: labels and classes now, pixels when a loader's workers decode them.

    Args:
        spec: tar shards (a pattern, a glob or one tar), an image folder, a CSV of path,label, or a Hugging Face
            dataset (hf:NAME, a save_to_disk folder, parquet files).
        cache_dir: where the shard index is kept (default `default_cache_dir()`).
        classes: the training classes, to map a validation source's labels onto.

    Raises:
        DataSourceError: a built-in set (they are small: the cache holds them), or anything `load_source` refuses.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = spec.strip()
    path = Path(name).expanduser()
    if is_hf_spec(name):
        images = open_hf(name, cache_root, progress)
        src = StreamSource(images.labels, images.classes, images.description, read=images.read)
    elif is_shard_pattern(name) or (path.is_file() and _is_tar(path)):
        index = load_shard_index(expand_shards(name), cache_root, progress)
        src = StreamSource(index.labels, index.classes, index.description, list(index.skipped), index=index)
    elif path.is_dir():
        src = _labelled_rows(_folder_listing(path), f"image folder '{path}'")
    elif path.is_file() and path.suffix.lower() == ".csv":
        src = _labelled_rows(_csv_listing(path), f"CSV '{path}'")
    elif not can_stream(name):
        raise DataSourceError(f"'{spec}' is a small built-in set: it is read through the decode cache (drop --stream)")
    else:
        raise DataSourceError(
            f"data source '{spec}' is not tar shards, an image folder, a .csv or a Hugging Face dataset "
            "(hf:NAME, a save_to_disk folder, .parquet files)"
        )
    return align_stream_classes(src, classes) if classes is not None else src


# --------------------------------------------------------------------------------------------- the size rule
def _probe_bytes(src: StreamSource, n: int) -> list[bytes | Path]:
    """The encoded images of up to `n` samples, spread over the source (shards: the first shard's first ones)."""
    if src.index is not None:
        out: list[bytes | Path] = []
        for sample in iter_samples(src.index.shards[0], src.index.layout, wanted=lambda j: j < n):
            if sample.index >= n:
                break
            out.append(sample.image or b"")
        return out
    picks = np.unique(np.linspace(0, len(src) - 1, min(n, len(src))).astype(int))
    return [src.read(int(i))[1] for i in picks]


def _pixels(data: bytes | Path) -> int | None:
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:  # an unreadable probe says nothing about the others
        return None


def estimated_cache_bytes(src: StreamSource, image_size: int | tuple[int, int] | None) -> int:
    """How large the decode cache of `src` would be: one uint8 RGB array at `image_size`, else at the size of a
    typical image (the median of a few images' headers, read without decoding)."""
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return len(src) * int(h) * int(w) * 3
    pixels = [p for p in map(_pixels, _probe_bytes(src, SIZE_PROBES)) if p]
    return len(src) * int(np.median(pixels) if pixels else 224 * 224) * 3


__all__ = [
    "CACHE_LIMIT_ENV",
    "DEFAULT_CACHE_LIMIT",
    "cache_limit",
    "can_stream",
    "estimated_cache_bytes",
    "format_size",
    "open_stream_source",
    "parse_size",
]
