"""Dataset sources: turn `--data SPEC` into one uint8 image array, decoded once and cached.

A spec is one of:
  * a directory in ImageFolder layout (`root/<class>/.../img.jpg`; the class level is found automatically),
  * a `.tar` / `.tar.gz` / `.tgz` of such a directory, read in place with `tarfile` (never unpacked to disk),
  * a `.csv` of `path,label` rows (paths relative to the CSV; header optional; labels as names or ints),
  * `digits` (scikit-learn's 8x8 digits), `cifar10` / `cifar100` (torchvision's downloader; `:test` for the test split),
  * WebDataset tar shards (`shards/train-{000000..000099}.tar`, a glob, or one tar of image + cls members: shards.py),
  * a Hugging Face dataset: `hf:NAME[:SPLIT]`, a `save_to_disk` folder or parquet files (hf_datasets.py).

Where labels are not needed (`unlabelled_ok=True`, pretraining), a folder or archive whose images lie directly in
its top folder is read too: all its images, as the one class `UNLABELLED`.

Every image file goes through `decode_image`, so odd formats convert and broken files are skipped and named in
`ImageArrayDataset.skipped` instead of stopping the run. Decoded arrays are written once to a `.npy` memmap in the
cache folder, keyed by the source's path, sizes and modification times, so a second load never decodes again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import tarfile
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write, atomic_write_bytes
from .decode import ImageDecodeError, decode_image
from .hf_datasets import hf_listing, is_hf_spec, open_hf
from .listing import IMAGE_EXTENSIONS, DataSourceError  # noqa: F401  (IMAGE_EXTENSIONS: read from here too)
from .listing import Listing as _Listing
from .listing import class_of_paths as _class_of_paths
from .listing import is_image_name as _is_image_name
from .listing import no_class_folders as _no_class_folders
from .shards import CLASSES_FILE, expand_shards, is_shard_pattern, load_shard_index, looks_like_shard, shard_listing

log = logging.getLogger("vitkit.data")

CACHE_FORMAT_VERSION = 1  # bump when the cached layout or decoding rules change
DECODE_CHUNK = 512  # images per task sent to a decoder process
UNLABELLED = "(unlabelled)"  # the one class of a folder or archive without class folders, read with unlabelled_ok


@dataclass
class ImageArrayDataset:
    """A whole dataset as one uint8 array, decoded once."""

    images: np.ndarray  # (N, H, W, C) uint8, in memory or an np.memmap of the cache file
    labels: np.ndarray  # (N,) int64 class indices into `classes`; a task's targets ((N, K) multi-hot: multilabel)
    classes: list[str]  # index -> class name
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason) for each bad file
    source: str = ""  # human-readable description
    cache_path: str | None = None  # folder holding the decoded arrays, when cached on disk
    from_cache: bool = False  # True when this load read the cache instead of decoding
    load_seconds: float = 0.0  # wall time of this load (decode + cache write, or cache read)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.images.shape[1]), int(self.images.shape[2]))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------------------- entry


def default_cache_dir() -> Path:
    """`$VITKIT_CACHE`, else `$XDG_CACHE_HOME/vitkit`, else `~/.cache/vitkit`."""
    if os.environ.get("VITKIT_CACHE"):
        return Path(os.environ["VITKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitkit"


def load_source(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    classes: Sequence[str] | None = None,
    unlabelled_ok: bool = False,
) -> ImageArrayDataset:
    """Load a dataset from `spec` (folder, tar, CSV, `digits`, `cifar10`, `cifar100`) as a uint8 array.

    Args:
        spec: what `--data` received (see the module docstring).
        cache_dir: where decoded arrays (and torchvision downloads) are kept; default `default_cache_dir()`.
        image_size: resize every image to this (H, W); None keeps the most common size and resizes the rest.
        progress: show a progress bar while decoding.
        classes: class names to map labels onto (e.g. the training set's, for a `--val-data`); a label not among
            them is a DataSourceError.
        unlabelled_ok: the caller does not use labels: a folder or archive with its images directly in the top
            folder (no class folders) is read as the one class `UNLABELLED` instead of refused.

    Returns:
        ImageArrayDataset with images (N, H, W, 3) uint8 (digits: (N, 8, 8, 1)), labels (N,) int64.

    Raises:
        DataSourceError: unknown spec, no images, label mismatch, or a download that cannot happen.
    """
    start = time.perf_counter()
    size = _as_size(image_size)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = spec.strip()
    path = Path(name).expanduser()
    if not path.exists() and name.lower().split(":")[0] in _BUILTINS:
        ds = _BUILTINS[name.lower().split(":")[0]](name.lower(), cache_root, size)
    elif is_hf_spec(name):
        ds = _load_hf(name, cache_root, size, progress)
    elif is_shard_pattern(name) or (path.is_file() and _is_tar(path) and looks_like_shard(path)):
        ds = _load_shards(name, cache_root, size, progress)
    elif path.is_dir():
        ds = _load_cached(
            path, "folder", cache_root, size, progress, partial(_folder_listing, unlabelled_ok=unlabelled_ok)
        )
    elif path.is_file() and _is_tar(path):
        ds = _load_cached(path, "tar", cache_root, size, progress, partial(_tar_listing, unlabelled_ok=unlabelled_ok))
    elif path.is_file() and path.suffix.lower() == ".csv":
        ds = _load_cached(path, "csv", cache_root, size, progress, _csv_listing)
    elif not path.exists():
        raise DataSourceError(
            f"data source '{spec}' does not exist; pass an image folder (root/<class>/img.jpg), a .tar/.tar.gz of "
            f"one, a .csv of path,label rows, tar shards ('shards/train-{{000000..000099}}.tar'), a Hugging Face "
            f"dataset (hf:NAME, a save_to_disk folder, .parquet files), or one of: {', '.join(sorted(_BUILTINS))}"
        )
    else:
        raise DataSourceError(
            f"data source '{spec}' is not a folder, a .tar/.tar.gz/.tgz archive or a .csv file; "
            "pass one of those (or digits / cifar10 / cifar100)"
        )
    if ds.classes == [UNLABELLED] and not unlabelled_ok:  # decoded (and cached) by an earlier unlabelled read
        raise DataSourceError(_no_class_folders(ds.source))
    if classes is not None:
        ds = align_classes(ds, classes)
    ds.load_seconds = time.perf_counter() - start
    return ds


def _load_shards(spec: str, cache_root: Path, size: tuple[int, int] | None, progress: bool) -> ImageArrayDataset:
    """Tar shards through the decode cache; the samples the shard index left out are named in `skipped` too."""
    shards = expand_shards(spec)
    index = load_shard_index(shards, cache_root, progress)
    sidecar = shards[0].parent / CLASSES_FILE
    files = shards + ([sidecar] if sidecar.is_file() else [])
    ds = _load_cached(shards[0], "shards", cache_root, size, progress, lambda _: shard_listing(index), files=files)
    ds.skipped = list(index.skipped) + [s for s in ds.skipped if s not in index.skipped]
    return ds


def _load_hf(spec: str, cache_root: Path, size: tuple[int, int] | None, progress: bool) -> ImageArrayDataset:
    """A Hugging Face dataset through the decode cache, keyed by the Arrow files its rows live in."""
    images = open_hf(spec, cache_root, progress)
    if not images.files:
        raise DataSourceError(
            f"{images.description}: the dataset is in memory only; save_to_disk it and pass the folder"
        )
    return _load_cached(
        images.files[0], "hf", cache_root, size, progress, lambda _: hf_listing(images), files=images.files
    )


def align_classes(ds: ImageArrayDataset, classes: Sequence[str]) -> ImageArrayDataset:
    """Re-index `ds.labels` onto `classes` (e.g. a validation set onto the training set's classes).

    Raises:
        DataSourceError: `ds` has a class that `classes` lacks.
    """
    classes = [str(c) for c in classes]
    if list(ds.classes) == classes:
        return ds
    missing = [c for c in ds.classes if c not in classes]
    if missing:
        raise DataSourceError(
            f"{ds.source}: classes {missing[:10]} are not among the {len(classes)} training classes "
            f"({classes[:10]}{'...' if len(classes) > 10 else ''}); use data with the same class names"
        )
    remap = np.array([classes.index(c) for c in ds.classes], dtype=np.int64)
    return ImageArrayDataset(
        images=ds.images,
        labels=remap[ds.labels],
        classes=classes,
        skipped=ds.skipped,
        source=ds.source,
        cache_path=ds.cache_path,
        from_cache=ds.from_cache,
        load_seconds=ds.load_seconds,
    )


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val) so every class keeps its share in both; same seed, same split.

    Each class with n samples gives round(n * val_fraction) of them to val (at least one when n >= 2 and the
    fraction is positive, and never all of them). Both index arrays come back sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.zeros(0, np.int64)
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    return train.astype(np.int64), val.astype(np.int64)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset that keeps `fraction` of every class (few-label training).

    Each class with n samples keeps round(n * fraction) of them, at least one; fraction 1 keeps everything.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the fraction to keep must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(labels), dtype=np.int64)
    return stratified_split(labels, fraction, seed)[1]


# ----------------------------------------------------------------------------------------------- listing sources
# A listing streams (name, bytes-or-path) in a fixed order and, once the stream is spent, labels what it streamed.


def _labels_from_folders(names: list[str], parts: list[tuple[str, ...]], where: str, unlabelled_ok: bool = False):
    """Label entries by their class folder; warn about images lying above the class level. With `unlabelled_ok`,
    images directly in the top folder are all of the one class UNLABELLED."""
    if unlabelled_ok and parts and all(len(p) == 1 for p in parts):
        return [0] * len(names), [UNLABELLED]
    folders, classes = _class_of_paths(parts, where)
    index = {c: i for i, c in enumerate(classes)}
    loose = [n for n, c in zip(names, folders) if c is None]
    if loose:
        log.warning("%s: ignored %d image(s) outside the class folders, e.g. %s", where, len(loose), loose[:3])
    return [index[c] if c is not None else None for c in folders], classes


def _walk_files(root: Path) -> Iterable[Path]:
    """All files under `root`, following symlinked folders once each (a symlink loop cannot hang the walk)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []  # been here through another link: do not descend again
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            yield Path(dirpath) / f


def _folder_listing(root: Path, unlabelled_ok: bool = False) -> _Listing:
    where = f"image folder '{root}'"
    files = [p for p in _walk_files(root) if _is_image_name(p.relative_to(root).as_posix())]
    names = [p.relative_to(root).as_posix() for p in files]
    labels, classes = _labels_from_folders(names, [p.relative_to(root).parts for p in files], where, unlabelled_ok)
    return _Listing(f"image folder {root}", list(zip(names, files)), lambda: (labels, classes), len(files))


def _is_tar(path: Path) -> bool:
    n = path.name.lower()
    return n.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def _tar_listing(path: Path, unlabelled_ok: bool = False) -> _Listing:
    where = f"archive '{path}'"
    names: list[str] = []
    parts: list[tuple[str, ...]] = []

    def stream() -> Iterable[tuple[str, bytes]]:
        # Members in archive order: a compressed tar only streams forwards, so random access would re-inflate it.
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    if not m.isfile() or not _is_image_name(m.name):
                        continue
                    f = tf.extractfile(m)
                    data = f.read() if f is not None else b""
                    names.append(m.name)
                    parts.append(tuple(p for p in m.name.replace("\\", "/").split("/") if p not in ("", ".")))
                    yield m.name, data
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataSourceError(f"{where} could not be read ({e}); check that the file is a complete tar") from None

    return _Listing(f"tar archive {path}", stream(), lambda: _labels_from_folders(names, parts, where, unlabelled_ok))


_HEADER_WORDS = {"path", "file", "filename", "file_name", "image", "img", "filepath", "image_path", "name"}


def _csv_rows(path: Path) -> tuple[list[tuple[str, Path]], list[int], list[str]]:
    """(name, file) per row, the label indices and the class names of a `path,label` CSV."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"CSV '{path}' could not be read ({e})") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in _HEADER_WORDS:
        rows = rows[1:]
    pairs = []
    for line_no, r in enumerate(rows, start=1):
        if len(r) < 2 or not r[0].strip() or not r[1].strip():
            raise DataSourceError(f"CSV '{path}': row {line_no} {r!r} is not 'path,label'; every row needs both")
        pairs.append((r[0].strip(), r[1].strip()))
    if not pairs:
        raise DataSourceError(f"CSV '{path}' has no rows; expected lines of 'path,label'")
    raw = [lab for _, lab in pairs]
    if all(_is_int(lab) for lab in raw):  # integer labels are class indices
        labels = [int(lab) for lab in raw]
        if min(labels) < 0:
            raise DataSourceError(f"CSV '{path}': negative label {min(labels)}; labels are names or indices >= 0")
        if max(labels) >= 1_000_000:  # an id column taken for labels would build a billion-class list
            raise DataSourceError(
                f"CSV '{path}': label {max(labels)} means over a million classes; integer labels "
                "must be class indices 0..K-1 (or use class names)"
            )
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(raw))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[lab] for lab in raw]
    files = [(rel, Path(rel) if Path(rel).is_absolute() else path.parent / rel) for rel, _ in pairs]
    return files, labels, classes


def _csv_listing(path: Path) -> _Listing:
    files, labels, classes = _csv_rows(path)
    return _Listing(f"CSV {path}", files, lambda: (list(labels), classes), len(files))


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ decode + cache


def _as_size(image_size: int | tuple[int, int] | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def _fingerprint(path: Path, kind: str, size: tuple[int, int] | None, files: Iterable[Path] | None = None) -> str:
    """A hash of what the decoded arrays depend on: the files' paths, sizes and modification times."""
    h = hashlib.sha256()
    st = path.stat()
    h.update(repr((CACHE_FORMAT_VERSION, kind, str(path.resolve()), st.st_size, st.st_mtime_ns, size)).encode())
    if files is None and kind in ("folder", "csv"):
        files = _walk_files(path) if kind == "folder" else (p for _, p in _csv_rows(path)[0])
    if files is not None:  # a folder's own mtime misses edits inside it: include every file's stat
        for p in files:
            try:
                s = p.stat()
                h.update(f"{p}\0{s.st_size}\0{s.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))  # non-UTF-8 names
            except OSError:
                h.update(f"{p}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C): scale the shorter side to fit, then center-crop (keeps the aspect ratio)."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    pil = Image.fromarray(img)
    scale = max(h / img.shape[0], w / img.shape[1])
    rh, rw = max(h, round(img.shape[0] * scale)), max(w, round(img.shape[1] * scale))
    pil = pil.resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = (rh - h) // 2, (rw - w) // 2
    return np.asarray(pil.crop((left, top, left + w, top + h)), dtype=np.uint8)


def _decode_chunk(chunk: list[tuple[str, bytes | Path]], size: tuple[int, int] | None) -> list[np.ndarray | str]:
    """Decoded (H, W, 3) arrays, or for each bad file the reason it was skipped (runs in a worker process)."""
    out: list[np.ndarray | str] = []
    for name, src in chunk:
        try:
            img = decode_image(src, name=name)
        except ImageDecodeError as e:
            out.append(str(e))
            continue
        out.append(_resize(img, size) if size is not None else img)
    return out


def decode_workers() -> int:
    """Decoder processes: `$VITKIT_DECODE_WORKERS`, else up to 2 (0 or 1: decode in this process)."""
    env = os.environ.get("VITKIT_DECODE_WORKERS")
    if env is not None:
        return max(int(env), 0)
    return min(2, os.cpu_count() or 1)


def _decode_stream(
    stream: Iterable[tuple[str, bytes | Path]], size: tuple[int, int] | None, progress: bool, total: int | None
) -> tuple[list[str], list[np.ndarray | str]]:
    """Decode every entry of `stream`, in order. Chunks go to forked worker processes while the stream is still
    being read (a tar inflates while earlier chunks decode); small datasets decode in this process."""
    from tqdm.auto import tqdm

    names: list[str] = []
    results: list[np.ndarray | str] = []
    workers = decode_workers() if "fork" in mp.get_all_start_methods() else 0
    pool: ProcessPoolExecutor | None = None
    pending: deque = deque()
    chunk: list[tuple[str, bytes | Path]] = []
    bar = tqdm(total=total, desc="decoding", unit="img", disable=not progress, leave=False)

    def collect(block: bool) -> None:
        while pending and (block or pending[0].done()):
            done = pending.popleft().result()
            results.extend(done)
            bar.update(len(done))

    def submit(part: list[tuple[str, bytes | Path]]) -> None:
        nonlocal pool
        if workers > 1 and pool is None and len(names) > DECODE_CHUNK:  # big enough to be worth the processes
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
        if pool is None:
            done = _decode_chunk(part, size)
            results.extend(done)
            bar.update(len(done))
        else:
            pending.append(pool.submit(_decode_chunk, part, size))
            collect(block=len(pending) > 4 * workers)  # bounded queue: memory stays flat on huge archives

    try:
        for name, src in stream:
            names.append(name)
            chunk.append((name, src))
            if len(chunk) == DECODE_CHUNK:
                submit(chunk)
                chunk = []
        if chunk:
            submit(chunk)
        collect(block=True)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return names, results


def _assemble(
    names: list[str], results: list, labels: list[int | None], size: tuple[int, int] | None, where: str
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decoded results -> (images (N, H, W, C), labels (N,), skipped), ordered by file name."""
    arrays: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i in sorted(range(len(names)), key=names.__getitem__):  # archive order must not matter: sort by name
        if labels[i] is None:
            continue
        if isinstance(results[i], str):
            skipped.append((names[i], results[i]))
        else:
            arrays.append(results[i])
            kept.append(labels[i])
    if skipped:
        shown = "; ".join(f"{n} ({r})" for n, r in skipped[:3])
        log.warning("%s: skipped %d unreadable file(s): %s%s", where, len(skipped), shown, " ..." * (len(skipped) > 3))
    if not arrays:
        raise DataSourceError(f"{where}: none of the {len(names)} image files could be decoded; e.g. {skipped[:3]}")
    if size is None:  # different sizes: resize the odd ones to the most common size
        size = Counter(a.shape[:2] for a in arrays).most_common(1)[0][0]
        odd = sum(a.shape[:2] != size for a in arrays)
        if odd:
            log.info("%s: resized %d image(s) to the most common size %dx%d", where, odd, size[0], size[1])
            arrays = [_resize(a, size) for a in arrays]
    return np.stack(arrays), np.asarray(kept, dtype=np.int64), skipped


def _load_cached(
    path: Path,
    kind: str,
    cache_root: Path,
    size: tuple[int, int] | None,
    progress: bool,
    lister: Callable[[Path], _Listing],
    files: Iterable[Path] | None = None,
) -> ImageArrayDataset:
    """Read the decoded arrays from the cache, or decode everything once and write the cache (`files`: the image
    files the arrays depend on, when `kind` alone does not say how to list them)."""
    key = _fingerprint(path, kind, size, files)
    folder = cache_root / "decoded" / f"{path.name}-{key}"
    if (folder / "meta.json").exists():
        try:
            return _read_cache(folder)
        except (OSError, ValueError, KeyError) as e:
            log.warning("decode cache %s is unreadable (%s); decoding again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)  # else _write_cache keeps the broken copy and we load it
    t0 = time.perf_counter()
    listing = lister(path)
    names, results = _decode_stream(listing.stream, size, progress, listing.total)
    labels, classes = listing.label()
    images, labels, skipped = _assemble(names, results, labels, size, listing.description)
    present = set(labels.tolist())
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty and kind != "csv":
        log.warning("%s: classes with no readable image: %s", listing.description, empty[:10])
    log.info("%s: decoded %d images in %.1f s", listing.description, len(labels), time.perf_counter() - t0)
    ds = ImageArrayDataset(images=images, labels=labels, classes=classes, skipped=skipped, source=listing.description)
    try:
        _write_cache(folder, ds)
        ds.images = np.load(folder / "images.npy", mmap_mode="r")
        ds.cache_path = str(folder)
    except OSError as e:
        log.warning("could not write the decode cache to %s (%s); keeping the images in memory only", folder, e)
    return ds


def _read_cache(folder: Path) -> ImageArrayDataset:
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy").astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    log.info("%s: %d images from the decode cache %s", meta["source"], len(labels), folder)
    return ImageArrayDataset(
        images=images,
        labels=labels,
        classes=list(meta["classes"]),
        skipped=[tuple(s) for s in meta["skipped"]],
        source=meta["source"],
        cache_path=str(folder),
        from_cache=True,
    )


def _write_cache(folder: Path, ds: ImageArrayDataset) -> None:
    """Write the arrays, then meta.json, each atomically; meta.json comes last, so a folder that has one holds
    complete arrays (a crash mid-write leaves no meta.json, and the next load decodes again).

    When another process (another rank) finished the same cache first, its copy is kept and ours dropped.
    """
    if (folder / "meta.json").exists():
        return
    with atomic_write(folder / "images.npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=ds.images.shape)
        mm[:] = ds.images
        mm.flush()
        del mm
    with atomic_write(folder / "labels.npy") as tmp:
        np.save(tmp, ds.labels)
    meta = {"classes": ds.classes, "skipped": [list(s) for s in ds.skipped], "source": ds.source}
    atomic_write_bytes(folder / "meta.json", json.dumps(meta).encode())


def load_file_list(
    source: str | Path,
    files: Sequence[tuple[str, Path]],
    *,
    cache_dir: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    description: str | None = None,
) -> ImageArrayDataset:
    """Decode a list of (name, image file) rows named by `source` (e.g. a task's own CSV), through the decode cache.

    For readers whose targets are not one class per image: `labels[i]` of the result is the row (index into
    `files`) that image i came from, so the reader maps its own targets onto the decoded images; unreadable files
    are skipped and named in `skipped`, as for every source.
    """
    source = Path(source)
    rows = list(files)

    def listing(_: Path) -> _Listing:
        return _Listing(description or f"file list {source}", rows, lambda: (list(range(len(rows))), []), len(rows))

    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _load_cached(
        source, "file-list", cache_root, _as_size(image_size), progress, listing, files=[p for _, p in rows]
    )


# ------------------------------------------------------------------------------------------------------ builtins


def _digits(spec: str, cache_root: Path, size: tuple[int, int] | None) -> ImageArrayDataset:
    from ..optional import require

    d = require("sklearn.datasets", "the built-in 'digits' set").load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    if size is not None and size != (8, 8):
        images = np.stack([_resize(im[..., 0], size)[..., None] for im in images])
    return ImageArrayDataset(
        images=images,
        labels=d.target.astype(np.int64),
        classes=[str(i) for i in range(10)],
        source="scikit-learn digits (8x8 grayscale)",
    )


_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
DOWNLOAD_TIMEOUT_S = 10.0


def _cifar(spec: str, cache_root: Path, size: tuple[int, int] | None) -> ImageArrayDataset:
    from torchvision import datasets

    name, _, split = spec.partition(":")
    if split not in ("", "train", "test"):
        raise DataSourceError(f"'{spec}': the split after ':' must be train or test")
    train = split != "test"
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = cache_root / "torchvision"
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:  # not downloaded yet (or corrupt): fetch it, but never hang when offline
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as e:  # URLError, timeouts, HTTP errors, checksum failures: all mean "no copy here"
            raise DataSourceError(
                f"could not download {name.upper()} from {_CIFAR_URLS[name]} into {root} ({type(e).__name__}: {e}). "
                "If this machine is offline, pass a local copy instead: --data path/to/folder-or-tar (an image "
                f"folder root/<class>/img.png or a .tar/.tar.gz of one), or put {Path(_CIFAR_URLS[name]).name} "
                f"into {root}"
            ) from None
        finally:
            socket.setdefaulttimeout(old)
    images = np.asarray(ds.data, dtype=np.uint8)  # (N, 32, 32, 3)
    if size is not None and size != images.shape[1:3]:
        images = np.stack([_resize(im, size) for im in images])
    return ImageArrayDataset(
        images=images,
        labels=np.asarray(ds.targets, dtype=np.int64),
        classes=list(ds.classes),
        source=f"{name.upper()} {'train' if train else 'test'} (torchvision, {root})",
        cache_path=str(root),
        from_cache=True,
    )


_BUILTINS: dict[str, Callable[[str, Path, tuple[int, int] | None], ImageArrayDataset]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
}
