"""What every image source reader shares: its error type, which names are images, where the class folders are,
and the `Listing` a reader hands to the decode cache.

A module of its own so that the readers (sources.py for folders, tars and CSVs; shards.py; hf_datasets.py) can use
these while sources.py dispatches to the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico".split()
)


class DataSourceError(ValueError):
    """The data could not be used (empty, wrong labels, unreachable download); the message says what to do."""


@dataclass
class Listing:
    """A source's entries: it streams (name, bytes-or-path) in a fixed order and, once the stream is spent,
    labels what it streamed."""

    description: str
    stream: Iterable[tuple[str, bytes | Path]]  # read lazily, so a tar is inflated while earlier chunks decode
    label: Callable[[], tuple[list[int | None], list[str]]]  # after the stream: a label per entry (None: not a
    # sample, e.g. an image above the class folders) and the class names
    total: int | None = None  # number of entries when known up front (progress bar)


def is_image_name(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts if p):
        return False  # hidden files and macOS resource forks
    return Path(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS


def class_of_paths(rel_paths: list[tuple[str, ...]], where: str) -> tuple[list[str | None], list[str]]:
    """Find the class level: the first folder below the deepest folder shared by all images.

    `rel_paths` are the images' path components (file name last). Images lying above the class level get None.
    """
    if not rel_paths:
        raise DataSourceError(f"{where}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    parents = [p[:-1] for p in rel_paths]
    common = list(parents[0])
    for p in parents[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        del common[n:]
        if not common:
            break
    if all(len(p) == len(common) for p in parents):  # all images in one folder: that folder is the only class
        if not common:
            raise DataSourceError(no_class_folders(where))
        common = common[:-1]
    depth = len(common)
    names = [p[depth] if len(p) > depth else None for p in parents]
    return names, sorted({n for n in names if n is not None})


def no_class_folders(where: str) -> str:
    return (
        f"{where}: images lie directly in the top folder; put them in one subfolder per class "
        "(root/<class>/img.jpg) or use a CSV of path,label"
    )


__all__ = ["DataSourceError", "IMAGE_EXTENSIONS", "Listing", "class_of_paths", "is_image_name", "no_class_folders"]
