"""Hugging Face `datasets` as an image source: a `save_to_disk` folder, parquet files, or a Hub dataset.

  * a folder written by `Dataset.save_to_disk` (a `DatasetDict`'s too: `folder:split`, default `train`),
  * parquet files: `data/train-*.parquet`, `data/train-{00000..00003}.parquet` or one file,
  * `hf:OWNER/NAME[@REVISION][:SPLIT]`: a dataset on the Hub (default split `train`).

A Hub dataset goes through `datasets.load_dataset` into the datasets cache (HF_HOME, HF_DATASETS_CACHE), which
vitkit does not override, and follows its offline rules as the model hub does (vitkit/interop/hub.py): with
HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) only the cache is read; any failure is one DataSourceError that says
how to get the data. Parquet files are converted once into vitkit's cache folder (Arrow, memory-mapped), so rows
are read on demand and a dataset larger than memory stays on disk.

The image column is the first `Image` feature (else a column named `image` or `img`), read as its encoded bytes and
decoded by vitkit (`decode_image`), so broken rows are skipped and named as for every source. The label column is
the first `ClassLabel` feature (its names are the classes), else a column named `label`, `labels`, `fine_label`
or `class`: integers are class indices, text is class names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .listing import DataSourceError, Listing

log = logging.getLogger("vitkit.data")

HF_PREFIX = "hf:"
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
DEFAULT_SPLIT = "train"


def _datasets() -> Any:
    from ..optional import require

    return require("datasets", "Hugging Face datasets (hf:NAME, save_to_disk folders, parquet files)")


def _split_suffix(spec: str) -> tuple[str, str | None]:
    """`path:split` -> (path, split) when the path without the suffix exists (a colon may be part of a path)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail and not Path(spec).exists() and Path(head).expanduser().exists():
        return head, tail
    return spec, None


def _is_saved_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)


def is_parquet_spec(spec: str) -> bool:
    return spec.strip().lower().rstrip("}").endswith(".parquet")


def is_hf_spec(spec: str) -> bool:
    """Whether `--data spec` names a Hugging Face dataset (Hub name, save_to_disk folder, parquet files)."""
    text = spec.strip()
    if text.startswith(HF_PREFIX) or is_parquet_spec(text):
        return True
    return _is_saved_folder(Path(_split_suffix(text)[0]).expanduser())


@dataclass
class HFImages:
    """A `datasets.Dataset` read row by row: encoded image bytes and class indices."""

    dataset: Any  # datasets.Dataset, the image column cast to Image(decode=False)
    image_column: str
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    description: str
    files: list[Path]  # the Arrow files the rows live in (what the decode cache's fingerprint depends on)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> tuple[str, bytes | Path]:
        """Row i's (name for messages, encoded image bytes or the file it points to)."""
        cell = self.dataset[int(i)][self.image_column]
        name = f"{self.description}[{i}]"
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return name, cell["bytes"]
            if cell.get("path"):
                return f"{name} ({cell['path']})", Path(cell["path"])
            return name, b""
        return name, cell if isinstance(cell, (bytes, bytearray)) else b""


# ------------------------------------------------------------------------------------------------ loading
def _load_hub(spec: str) -> tuple[Any, str]:
    text = spec.strip()[len(HF_PREFIX) :]
    name, _, split = text.partition(":")
    name, _, revision = name.partition("@")
    split = split or DEFAULT_SPLIT
    if not name:
        raise DataSourceError(f"'{spec}': name a Hub dataset after 'hf:', e.g. hf:uoft-cs/cifar10:test")
    ds = _datasets()
    try:
        dataset = ds.load_dataset(name, split=split, revision=revision or None)
    except Exception as e:  # offline, not found, gated, no such split, a broken download: one line, how to fix it
        offline = _offline(ds)
        where = "only the datasets cache is read (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set); " if offline else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataSourceError(
            f"could not load the Hub dataset '{name}' split '{split}' ({type(e).__name__}: {first}); {where}"
            f"load it once where the Hub is reachable (python -c \"import datasets; datasets.load_dataset('{name}', "
            f"split='{split}')\") or pass a save_to_disk folder or parquet files"
        ) from None
    return dataset, f"Hub dataset {name}:{split}"


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _offline(ds: Any) -> bool:
    """Offline as `datasets` read it at import, or as the environment says now (the model hub's rule)."""
    read_at_import = any(bool(getattr(ds.config, v, False)) for v in _OFFLINE_VARS)
    return read_at_import or any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)


def _load_saved(path: Path, split: str | None) -> tuple[Any, str]:
    ds = _datasets()
    try:
        loaded = ds.load_from_disk(str(path))
    except Exception as e:
        raise DataSourceError(f"'{path}' could not be read as a datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(loaded, ds.DatasetDict):
        split = split or DEFAULT_SPLIT
        if split not in loaded:
            raise DataSourceError(f"'{path}' has the splits {sorted(loaded)}, not '{split}'; pass {path}:SPLIT")
        return loaded[split], f"datasets folder {path}:{split}"
    if split is not None:
        raise DataSourceError(f"'{path}' holds one dataset, not a dict of splits; drop ':{split}'")
    return loaded, f"datasets folder {path}"


def _parquet_files(spec: str) -> list[str]:
    from .shards import expand_pattern

    return [str(p) for p in expand_pattern(spec, "parquet file")]


def _load_parquet(spec: str, cache_root: Path) -> tuple[Any, str]:
    files = _parquet_files(spec)
    try:
        dataset = _datasets().Dataset.from_parquet(files, cache_dir=str(cache_root / "hf-datasets"))
    except Exception as e:
        raise DataSourceError(f"parquet files '{spec}' could not be read ({type(e).__name__}: {e})") from None
    return dataset, f"parquet {files[0]}" + (f" .. ({len(files)} files)" if len(files) > 1 else "")


def _image_column(features: dict, where: str) -> str:
    image_type = _datasets().Image
    for name, feature in features.items():
        if isinstance(feature, image_type):
            return name
    for name in IMAGE_COLUMNS:
        if name in features:
            return name
    raise DataSourceError(
        f"{where}: no image column (an Image feature, or one named {IMAGE_COLUMNS}) in {list(features)}"
    )


def _labels(dataset: Any, features: dict, where: str) -> tuple[np.ndarray, list[str]]:
    class_label = _datasets().ClassLabel
    column = next((n for n, f in features.items() if isinstance(f, class_label)), None)
    column = column or next((n for n in LABEL_COLUMNS if n in features), None)
    if column is None:
        raise DataSourceError(
            f"{where}: no label column (a ClassLabel feature, or one named {LABEL_COLUMNS}) in {list(features)}"
        )
    values = dataset.data.column(column).to_pylist()
    if isinstance(features[column], class_label):
        return np.asarray(values, dtype=np.int64), [str(n) for n in features[column].names]
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        labels = np.asarray(values, dtype=np.int64)
        return labels, [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index[v] for v in values], dtype=np.int64), names
    raise DataSourceError(f"{where}: column '{column}' must hold class indices (ints >= 0) or class names")


def open_hf(spec: str, cache_root: Path, progress: bool = True) -> HFImages:
    """The dataset `spec` names (see the module docstring), ready to read row by row.

    Raises:
        DataSourceError: unreadable folder or files, no such split, no image or label column, a Hub failure.
        ImportError: the `datasets` package is missing (pip install 'vitkit[stream]').
    """
    ds = _datasets()
    quiet = not progress and not ds.utils.are_progress_bars_disabled()
    if quiet:
        ds.disable_progress_bars()
    try:
        text = spec.strip()
        if text.startswith(HF_PREFIX):
            dataset, where = _load_hub(text)
        elif is_parquet_spec(text):
            dataset, where = _load_parquet(text, cache_root)
        else:
            path, split = _split_suffix(text)
            dataset, where = _load_saved(Path(path).expanduser(), split)
    finally:
        if quiet:
            ds.enable_progress_bars()
    features = dict(dataset.features)
    image_column = _image_column(features, where)
    labels, classes = _labels(dataset, features, where)
    if len(labels) == 0:
        raise DataSourceError(f"{where}: the dataset has no rows")
    if isinstance(features[image_column], ds.Image):
        dataset = dataset.cast_column(image_column, ds.Image(decode=False))
    dataset = dataset.select_columns([image_column])  # only the images are read row by row
    files = [Path(f["filename"]) for f in dataset.cache_files]
    return HFImages(dataset, image_column, labels, classes, where, files)


def hf_listing(images: HFImages) -> Listing:
    """Every row's image, in row order, for the decode cache (`load_source` on a small dataset)."""

    def stream() -> Iterator[tuple[str, bytes | Path]]:
        for i in range(len(images)):
            name, data = images.read(i)
            yield f"{i:09d} {name}", data  # numbered: the cache sorts entries by name, rows keep their order

    labels = images.labels.tolist()
    return Listing(images.description, stream(), lambda: (labels, images.classes), len(labels))


__all__ = ["HF_PREFIX", "HFImages", "hf_listing", "is_hf_spec", "is_parquet_spec", "open_hf"]
