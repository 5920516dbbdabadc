"""Segmentation sources: images and their per-pixel class masks, decoded once into uint8 arrays and cached.

A spec is one of:
  * a folder holding `images/` and `masks/` (a mask has its image's path and stem, any image suffix:
    `images/a/001.jpg` <-> `masks/a/001.png`), and optionally `classes.txt` (one class name per line, line i
    naming class i),
  * a `.tar` / `.tar.gz` / `.tgz` of such a folder, read in place,
  * a `.csv` of `image,mask` rows (paths relative to the CSV; header optional; `classes.txt` beside the CSV).

A mask is an index or palette PNG: each pixel holds its class index (a palette PNG's indices, not its colours);
255 marks pixels to ignore (borders, unlabelled). Masks come out as (N, H, W) uint8, images as (N, H, W, C).

A pair that cannot be used is skipped and named with the reason, as `vitkit.data.sources` skips unreadable
images: an image without a mask, a mask whose size differs from its image, a mask with a label outside the
classes, or a file that does not decode. Every image and mask goes through one reader, so the cache key and
the rules are those of `sources.py`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..files import atomic_write, atomic_write_bytes
from .decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, display_name

# one reader of folders and archives for both kinds of data: the same hidden-file rules, symlink handling, cache home
from .sources import DataSourceError, _as_size, _is_image_name, _is_tar, _walk_files, default_cache_dir

log = logging.getLogger("vitkit.data")

IGNORE_INDEX = 255  # a mask value that no class uses: the loss and the metrics skip these pixels
MAX_CLASSES = 255  # class indices 0..254; 255 is the ignore value
CACHE_FORMAT_VERSION = 1  # bump when the cached layout or the decoding rules change
CLASSES_FILE = "classes.txt"
_CSV_HEADER_WORDS = {"image", "img", "path", "file", "filename", "image_path"}


@dataclass
class SegmentationDataset:
    """A whole segmentation set as two uint8 arrays, decoded once."""

    images: np.ndarray  # (N, H, W, C) uint8 (an np.memmap of the cache file after the first load)
    masks: np.ndarray  # (N, H, W) uint8 class index per pixel, IGNORE_INDEX = no label
    classes: list[str]  # index -> class name
    names: list[str] = field(default_factory=list)  # the image file of each sample
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason) for each pair left out
    source: str = ""
    cache_path: str | None = None
    from_cache: bool = False
    load_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def labels(self) -> np.ndarray:
        """The masks, under the name `BatchLoader` reads targets by: a batch's targets are its masks (B, H, W)."""
        return self.masks

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.images.shape[1]), int(self.images.shape[2]))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ------------------------------------------------------------------------------------------------ entry


def load_segmentation_source(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    classes: Sequence[str] | None = None,
) -> SegmentationDataset:
    """Load a segmentation set from `spec` (folder with images/ + masks/, a tar of one, or an image,mask CSV).

    Args:
        spec: what `--data` received (see the module docstring).
        cache_dir: where decoded arrays are kept; default `sources.default_cache_dir()`.
        image_size: resize every pair to this (H, W) (images bicubic, masks nearest); None keeps the most common
            size and resizes the rest to it.
        progress: show a progress bar while decoding.
        classes: the class names to check labels against (a validation set against the training set's); the
            source's own `classes.txt`, when it has one, must agree with them.

    Raises:
        DataSourceError: unknown spec, no usable pair, or classes that disagree.
    """
    start = time.perf_counter()
    path = Path(spec.strip()).expanduser()
    if path.is_dir():
        kind = "folder"
    elif path.is_file() and _is_tar(path):
        kind = "tar"
    elif path.is_file() and path.suffix.lower() == ".csv":
        kind = "csv"
    elif not path.exists():
        raise DataSourceError(
            f"segmentation data '{spec}' does not exist; pass a folder with images/ and masks/ (same file stems), "
            "a .tar/.tar.gz of one, or a .csv of image,mask rows"
        )
    else:
        raise DataSourceError(f"segmentation data '{spec}' is not a folder, a .tar/.tar.gz/.tgz archive or a .csv")
    size = _as_size(image_size)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    ds = _load_cached(path, kind, cache_root, size, progress)
    if classes is not None:
        ds = _check_classes(ds, [str(c) for c in classes])
    ds.load_seconds = time.perf_counter() - start
    return ds


def random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted index arrays: a seeded random `val_fraction` of n samples held out (at least one when
    n >= 2 and the fraction is positive, never all). Segmentation has no single label per image to stratify by."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


def _check_classes(ds: SegmentationDataset, classes: list[str]) -> SegmentationDataset:
    """`ds` checked against the classes it is meant to have: its own class list may be shorter (a set whose
    masks never reach the last classes), never different; a pixel labelled beyond `classes` is an error.
    A source without classes.txt has classes named by index: only their count is checked."""
    own = ds.classes
    unnamed = own == [str(i) for i in range(len(own))]
    if unnamed and len(own) > len(classes):
        raise DataSourceError(
            f"{ds.source}: masks hold labels up to {len(own) - 1}, outside the {len(classes)} expected classes "
            f"(0..{len(classes) - 1}, 255 = ignore)"
        )
    if not unnamed and own != classes[: len(own)]:
        raise DataSourceError(
            f"{ds.source}: classes {own[:10]} do not match the expected {classes[:10]}; use masks with the same "
            "class indices (and the same classes.txt)"
        )
    ds.classes = list(classes)
    return ds


# ----------------------------------------------------------------------------------------------- listings
# A listing pairs images with masks by their path below images/ and masks/ without the suffix (the "key").


@dataclass
class _Pair:
    name: str  # the image's name as shown in messages
    image: Path | bytes
    mask: Path | bytes | None  # None: no mask for this image
    mask_name: str = ""


@dataclass
class _Listing:
    description: str
    pairs: list[_Pair]
    classes: list[str] | None  # from classes.txt, None when there is none


def _split_at_role(parts: Sequence[str]) -> tuple[str, tuple[str, ...], str] | None:
    """('images' | 'masks', the parts above that folder, the key below it) for a member path, else None."""
    for i, p in enumerate(parts[:-1]):
        if p in ("images", "masks"):
            key = PurePosixPath(*parts[i + 1 :]).with_suffix("").as_posix()
            return p, tuple(parts[:i]), key
    return None


def _pair_up(images: dict[str, tuple[str, Path | bytes]], masks: dict[str, tuple[str, Path | bytes]]) -> list[_Pair]:
    """One _Pair per image, in key order; masks without an image are only counted (they are not samples)."""
    orphans = sorted(set(masks) - set(images))
    if orphans:
        log.warning("%d mask(s) have no image and are ignored, e.g. %s", len(orphans), orphans[:3])
    pairs = []
    for key in sorted(images):
        name, src = images[key]
        mask_name, mask = masks.get(key, ("", None))
        pairs.append(_Pair(name, src, mask, mask_name))
    return pairs


def _parse_classes(text: str, where: str) -> list[str]:
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise DataSourceError(f"{where}: expected one class name per line (line i names class i), no blank lines")
    if len(names) > MAX_CLASSES:
        raise DataSourceError(f"{where}: {len(names)} classes; masks are 8-bit with 255 = ignore, so at most 255")
    return names


def _folder_listing(root: Path) -> _Listing:
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise DataSourceError(
                f"segmentation folder '{root}' has no {sub}/ folder; put the images in {root}/images/ and their "
                f"masks (index or palette PNGs, same file stems) in {root}/masks/"
            )
    found: dict[str, dict[str, tuple[str, Path | bytes]]] = {"images": {}, "masks": {}}
    for sub in found:
        for p in _walk_files(root / sub):
            rel = p.relative_to(root / sub).as_posix()
            if _is_image_name(rel):
                found[sub][PurePosixPath(rel).with_suffix("").as_posix()] = (f"{sub}/{rel}", p)
    if not found["images"]:
        raise DataSourceError(f"segmentation folder '{root}': no image files in {root}/images/")
    names_file = root / CLASSES_FILE
    classes = (
        _parse_classes(names_file.read_text(encoding="utf-8-sig"), str(names_file)) if names_file.is_file() else None
    )
    return _Listing(f"segmentation folder {root}", _pair_up(found["images"], found["masks"]), classes)


def _tar_listing(path: Path) -> _Listing:
    found: dict[str, dict[str, tuple[str, bytes]]] = {"images": {}, "masks": {}}
    class_files: dict[tuple[str, ...], bytes] = {}
    tops: set[tuple[str, ...]] = set()
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = tuple(p for p in m.name.replace("\\", "/").split("/") if p not in ("", "."))
                if parts and parts[-1] == CLASSES_FILE:
                    class_files[parts[:-1]] = tf.extractfile(m).read()
                    continue
                role = _split_at_role(parts)
                if role is None or not _is_image_name(m.name):
                    continue
                sub, top, key = role
                tops.add(top)
                found[sub][key] = (m.name, tf.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataSourceError(
            f"archive '{path}' could not be read ({e}); check that the file is a complete tar"
        ) from None
    if not found["images"]:
        raise DataSourceError(f"archive '{path}' has no images/ folder with image files (and masks/ beside it)")
    if len(tops) > 1:
        raise DataSourceError(f"archive '{path}' holds several images/ + masks/ folders ({sorted(tops)[:3]}); keep one")
    top = next(iter(tops))
    classes = None
    if top in class_files:
        classes = _parse_classes(class_files[top].decode("utf-8-sig"), f"{path}:{'/'.join((*top, CLASSES_FILE))}")
    return _Listing(f"segmentation archive {path}", _pair_up(found["images"], found["masks"]), classes)


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"CSV '{path}' could not be read ({e})") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in _CSV_HEADER_WORDS:
        rows = rows[1:]
    pairs = []
    for line_no, r in enumerate(rows, start=1):
        if len(r) < 2 or not r[0].strip():
            raise DataSourceError(f"CSV '{path}': row {line_no} {r!r} is not 'image,mask'; every row needs both")
        pairs.append((r[0].strip(), r[1].strip()))
    if not pairs:
        raise DataSourceError(f"CSV '{path}' has no rows; expected lines of 'image,mask'")
    return pairs


def _csv_listing(path: Path) -> _Listing:
    def resolve(rel: str) -> Path:
        return Path(rel) if Path(rel).is_absolute() else path.parent / rel

    pairs = [_Pair(img, resolve(img), resolve(mask) if mask else None, mask) for img, mask in _csv_rows(path)]
    names_file = path.parent / CLASSES_FILE
    classes = (
        _parse_classes(names_file.read_text(encoding="utf-8-sig"), str(names_file)) if names_file.is_file() else None
    )
    return _Listing(f"segmentation CSV {path}", pairs, classes)


_LISTERS = {"folder": _folder_listing, "tar": _tar_listing, "csv": _csv_listing}


# ------------------------------------------------------------------------------------------------ decoding


def decode_mask(source: Path | bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An index or palette image -> (H, W) uint8 class indices. A palette PNG gives its indices, not its colours;
    an RGB file is accepted only when it is gray (R = G = B), since colours are not class indices.

    Raises:
        ImageDecodeError: unreadable, too large, a colour image, or a value above 255.
    """
    name = display_name(name)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"mask '{name}' could not be read ({e.strerror or e})") from None
    try:
        img = Image.open(io.BytesIO(data))
        if img.size[0] * img.size[1] > max_pixels:
            raise ImageDecodeError(f"mask '{name}' is {img.size[0]}x{img.size[1]} pixels, over the limit; refused")
        img.load()
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise ImageDecodeError(f"mask '{name}' could not be decoded ({e or type(e).__name__})") from None
    if img.mode in ("P", "L", "1"):
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("LA", "PA"):
        return np.asarray(img.getchannel(0), dtype=np.uint8).copy()
    if img.mode.startswith("I"):  # 16/32-bit index images
        a = np.asarray(img).astype(np.int64)
        if a.min() < 0 or a.max() > 255:
            raise ImageDecodeError(
                f"mask '{name}' has values up to {a.max()}; class indices must be 0..254 (255 ignore)"
            )
        return a.astype(np.uint8)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].copy()
    raise ImageDecodeError(
        f"mask '{name}' is a colour ({img.mode}) image; save masks as index (L) or palette (P) PNGs whose pixel "
        "values are class indices (255 = ignore)"
    )


def _decode_pair(pair: _Pair, classes: list[str] | None) -> tuple[np.ndarray, np.ndarray] | str:
    """(image (H, W, C), mask (H, W)) or the reason this pair is left out."""
    if pair.mask is None:
        return f"image '{pair.name}' has no mask (expected masks/ with the same file stem)"
    try:
        image = decode_image(pair.image, name=pair.name)
        mask = decode_mask(pair.mask, pair.mask_name)
    except ImageDecodeError as e:
        return str(e)
    if mask.shape != image.shape[:2]:
        return (
            f"mask '{pair.mask_name}' is {mask.shape[1]}x{mask.shape[0]} but its image '{pair.name}' is "
            f"{image.shape[1]}x{image.shape[0]} (width x height); a mask must have its image's size"
        )
    if classes is not None:
        bad = np.unique(mask[(mask >= len(classes)) & (mask != IGNORE_INDEX)])
        if bad.size:
            return (
                f"mask '{pair.mask_name}' has label(s) {bad[:5].tolist()} outside the {len(classes)} classes of "
                f"{CLASSES_FILE} (0..{len(classes) - 1}, 255 = ignore)"
            )
    return image, mask


def _fit(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """Scale the shorter side to fit `size` (H, W), then center-crop: what `sources._resize` does to images."""
    h, w = size
    scale = max(h / img.height, w / img.width)
    rh, rw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
    img = img.resize((rw, rh), resample)
    top, left = (rh - h) // 2, (rw - w) // 2
    return img.crop((left, top, left + w, top + h))


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image (bicubic) and its mask (nearest: no label is invented between two others) alike."""
    if image.shape[:2] == tuple(size):
        return image, mask
    squeeze = image.shape[2] == 1
    img = _fit(Image.fromarray(image[..., 0] if squeeze else image), size, Image.Resampling.BICUBIC)
    img_a = np.asarray(img, dtype=np.uint8)
    m = np.asarray(_fit(Image.fromarray(mask), size, Image.Resampling.NEAREST), dtype=np.uint8)
    return (img_a[..., None] if squeeze else img_a), m


def _decode_all(listing: _Listing, size: tuple[int, int] | None, progress: bool) -> SegmentationDataset:
    from tqdm.auto import tqdm

    images, masks, names, skipped = [], [], [], []
    for pair in tqdm(listing.pairs, desc="decoding", unit="pair", disable=not progress, leave=False):
        out = _decode_pair(pair, listing.classes)
        if isinstance(out, str):
            skipped.append((pair.name, out))
            continue
        images.append(out[0])
        masks.append(out[1])
        names.append(pair.name)
    where = listing.description
    if skipped:
        shown = "; ".join(r for _, r in skipped[:3])
        log.warning("%s: skipped %d pair(s): %s%s", where, len(skipped), shown, " ..." * (len(skipped) > 3))
    if not images:
        raise DataSourceError(f"{where}: none of the {len(listing.pairs)} images has a usable mask; e.g. {skipped[:3]}")
    if size is None:
        size = Counter(a.shape[:2] for a in images).most_common(1)[0][0]
    odd = sum(a.shape[:2] != size for a in images)
    if odd:
        log.info("%s: resized %d pair(s) to %dx%d", where, odd, size[0], size[1])
        pairs = [resize_pair(a, m, size) for a, m in zip(images, masks)]
        images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    channels = Counter(a.shape[2] for a in images).most_common(1)[0][0]
    images = [a if a.shape[2] == channels else np.repeat(a[..., :1], channels, axis=2) for a in images]
    mask_arr = np.stack(masks)
    classes = listing.classes or _classes_from_masks(mask_arr)
    return SegmentationDataset(np.stack(images), mask_arr, classes, names, skipped, where)


def _classes_from_masks(masks: np.ndarray) -> list[str]:
    """Without classes.txt the classes are 0..the largest label present, named by their index."""
    present = np.unique(masks)
    present = present[present != IGNORE_INDEX]
    return [str(i) for i in range(int(present.max()) + 1 if present.size else 1)]


# ---------------------------------------------------------------------------------------------------- cache


def _fingerprint(path: Path, kind: str, size: tuple[int, int] | None) -> str:
    """A hash of what the arrays depend on: the source's files (paths, sizes, modification times) and the size."""
    h = hashlib.sha256()
    st = path.stat()
    h.update(repr(("seg", CACHE_FORMAT_VERSION, kind, str(path.resolve()), st.st_size, st.st_mtime_ns, size)).encode())
    if kind == "folder":
        files = list(_walk_files(path))
    elif kind == "csv":
        files = [path.parent / CLASSES_FILE] + [
            p if p.is_absolute() else path.parent / p for row in _csv_rows(path) for p in map(Path, row) if str(p)
        ]
    else:
        files = []
    for p in files:
        try:
            s = p.stat()
            h.update(f"{p}\0{s.st_size}\0{s.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{p}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _load_cached(
    path: Path, kind: str, cache_root: Path, size: tuple[int, int] | None, progress: bool
) -> SegmentationDataset:
    folder = cache_root / "decoded-segmentation" / f"{path.name}-{_fingerprint(path, kind, size)}"
    if (folder / "meta.json").exists():
        try:
            return _read_cache(folder)
        except (OSError, ValueError, KeyError) as e:
            log.warning("decode cache %s is unreadable (%s); decoding again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    ds = _decode_all(_LISTERS[kind](path), size, progress)
    try:
        _write_cache(folder, ds)
        ds.images = np.load(folder / "images.npy", mmap_mode="r")
        ds.masks = np.load(folder / "masks.npy", mmap_mode="r")
        ds.cache_path = str(folder)
    except OSError as e:
        log.warning("could not write the decode cache to %s (%s); keeping the arrays in memory only", folder, e)
    return ds


def _read_cache(folder: Path) -> SegmentationDataset:
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    masks = np.load(folder / "masks.npy", mmap_mode="r")
    if images.shape[:3] != masks.shape:
        raise ValueError(f"images {images.shape} and masks {masks.shape} do not match")
    return SegmentationDataset(
        images,
        masks,
        list(meta["classes"]),
        list(meta["names"]),
        [tuple(s) for s in meta["skipped"]],
        meta["source"],
        cache_path=str(folder),
        from_cache=True,
    )


def _write_cache(folder: Path, ds: SegmentationDataset) -> None:
    """The arrays first, meta.json last (each atomically): a folder with meta.json holds complete arrays."""
    if (folder / "meta.json").exists():
        return
    for name, array in (("images.npy", ds.images), ("masks.npy", ds.masks)):
        with atomic_write(folder / name) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=array.shape)
            mm[:] = array
            mm.flush()
            del mm
    meta = {"classes": ds.classes, "names": ds.names, "skipped": [list(s) for s in ds.skipped], "source": ds.source}
    atomic_write_bytes(folder / "meta.json", json.dumps(meta).encode())


__all__ = [
    "SegmentationDataset",
    "load_segmentation_source",
    "random_split",
    "decode_mask",
    "resize_pair",
    "IGNORE_INDEX",
]
