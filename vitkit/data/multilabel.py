"""Multi-label sources: images with any number of labels each, read from a CSV of `path,labels` rows.

    path,labels
    img/0001.jpg,cat;dog
    img/0002.jpg,dog
    img/0003.jpg,

Labels are separated by `;`; an empty field is an image with no label (a valid negative for every class). Paths are
relative to the CSV. `--data` may also name a folder holding such a `labels.csv` (paths relative to the folder).
Images are decoded through the decode cache like every source (vitkit.data.sources); the targets are an (N, K)
multi-hot array aligned with the decoded images.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import DataSourceError, ImageArrayDataset, load_file_list

LABELS_FILE = "labels.csv"  # the CSV a multi-label folder holds
SEPARATOR = ";"
_HEADER_PATHS = {"path", "file", "filename", "file_name", "image", "img", "filepath", "image_path", "name"}


@dataclass
class LabelRows:
    """A parsed multi-label CSV: one image file and its label names per row, in file order."""

    csv_path: Path
    files: list[tuple[str, Path]]  # (path as written, resolved file)
    labels: list[list[str]]  # label names per row (possibly empty)

    def classes(self) -> list[str]:
        """Every label name that occurs, sorted."""
        return sorted({name for row in self.labels for name in row})


def find_labels_csv(spec: str | Path) -> Path:
    """The CSV behind `spec`: the file itself, or a folder's `labels.csv`.

    Raises:
        DataSourceError: neither exists.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / LABELS_FILE).is_file():
            return path / LABELS_FILE
        raise DataSourceError(
            f"multi-label data: folder '{path}' has no {LABELS_FILE}; put one there (rows 'path,labels', labels "
            f"separated by '{SEPARATOR}', paths relative to the folder) or pass the CSV itself"
        )
    if path.is_file() and path.suffix.lower() == ".csv":
        return path
    raise DataSourceError(
        f"multi-label data '{spec}' is not a .csv of 'path,labels' rows nor a folder holding {LABELS_FILE}"
    )


def read_label_rows(csv_path: str | Path) -> LabelRows:
    """Parse a `path,labels` CSV (header optional); a malformed row is a DataSourceError naming its line."""
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"CSV '{csv_path}' could not be read ({e})") from None
    files: list[tuple[str, Path]] = []
    labels: list[list[str]] = []
    reader = csv.reader(text.splitlines())
    for row in reader:
        line = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if not files and line == 1 and row[0].strip().lower() in _HEADER_PATHS:
            continue  # a header
        if len(row) != 2 or not row[0].strip():
            raise DataSourceError(
                f"CSV '{csv_path}', line {line}: {','.join(row)!r} is not 'path,labels' (two fields; separate "
                f"labels with '{SEPARATOR}', e.g. img.jpg,cat{SEPARATOR}dog; an image without labels: img.jpg,)"
            )
        rel = row[0].strip()
        files.append((rel, Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel))
        labels.append(sorted({name.strip() for name in row[1].split(SEPARATOR) if name.strip()}))
    if not files:
        raise DataSourceError(f"CSV '{csv_path}' has no rows; expected lines of 'path,labels'")
    return LabelRows(csv_path, files, labels)


def multi_hot(rows: Sequence[Sequence[str]], classes: Sequence[str], where: str) -> np.ndarray:
    """(N, K) int64 multi-hot targets of label-name rows over `classes`.

    Raises:
        DataSourceError: a label that `classes` lacks.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({name for row in rows for name in row if name not in index})
    if unknown:
        raise DataSourceError(
            f"{where}: labels {unknown[:10]} are not among the model's {len(classes)} classes ({list(classes)[:10]}"
            f"{'...' if len(classes) > 10 else ''}); use data with the same label names"
        )
    targets = np.zeros((len(rows), len(classes)), dtype=np.int64)
    for i, row in enumerate(rows):
        targets[i, [index[name] for name in row]] = 1
    return targets


def load_multilabel(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    classes: Sequence[str] | None = None,
) -> ImageArrayDataset:
    """Load a multi-label source: images (N, H, W, C) uint8 and targets `labels` (N, K) multi-hot int64.

    Args:
        spec: a `path,labels` CSV, or a folder holding `labels.csv`.
        cache_dir, image_size, progress: as `vitkit.data.sources.load_source`.
        classes: the label names to map onto (a model's, or the training set's for validation data); default:
            every name in the CSV, sorted.

    Raises:
        DataSourceError: no CSV, a malformed row (naming its line), a label outside `classes`, no readable image.
    """
    rows = read_label_rows(find_labels_csv(spec))
    names = list(classes) if classes is not None else rows.classes()
    if not names:
        raise DataSourceError(f"CSV '{rows.csv_path}': no row has a label; multi-label data needs label names")
    where = f"multi-label CSV {rows.csv_path}"
    targets = multi_hot(rows.labels, names, where)
    ds = load_file_list(
        rows.csv_path, rows.files, cache_dir=cache_dir, image_size=image_size, progress=progress, description=where
    )
    ds.labels = targets[ds.labels]  # the decoded images' rows -> their targets (skipped files drop out)
    ds.classes = [str(c) for c in names]
    return ds


def random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a seeded random split (multi-label rows have no single class to stratify by):
    round(n * fraction) to validation, at least one when the fraction is positive and n >= 2. Both sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)
