"""Write any image source as WebDataset tar shards: what `vitkit shard SOURCE OUT --max-size 1GB` runs.

Each sample becomes `KEY.jpg|png|webp` (the file's own bytes: nothing is re-encoded that a shard reader takes as
it is; other formats become PNG), `KEY.cls` (the class index) and `KEY.json` (`{"path": ...}`, the file it came
from, so a bad sample named later can be found). The class names go to `OUT/classes.json`, which the shard reader
takes for the class names. Samples are written in a seeded random order, because a shard reader only shuffles
within a buffer: shards written in class order would give batches of one class.

A source that can be read in any order (folder, CSV, uncompressed tar, Hugging Face dataset) is shuffled as a
whole; a compressed tar or existing shards are written in their own order (reading them at random would inflate
them again for every sample) and the command says so. Each shard is written atomically and closed before it would
pass `max_size`; files that cannot be read are skipped and named.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write, atomic_write_bytes
from .decode import ImageDecodeError, decode_image
from .listing import DataSourceError, class_of_paths, is_image_name
from .shards import CLASSES_FILE, _is_compressed, iter_samples, looks_like_shard, read_sidecar
from .stream_sources import open_stream_source

log = logging.getLogger("vitkit.data")

TAR_END = 10240  # what closing a tar adds at most: two zero blocks, padded to a 10 KiB record


@dataclass
class ShardWriteReport:
    """What `write_shards` wrote."""

    shards: list[Path]
    samples: int
    classes: list[str]
    pattern: str  # the brace pattern naming every shard, for --data
    shuffled: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)


# (name, label, a function returning the encoded image) in the order they are written
Entry = tuple[str, int, Callable[[], bytes]]


def _read_bytes(data: bytes | Path) -> bytes:
    return data.read_bytes() if isinstance(data, Path) else bytes(data)


def _random_access_entries(spec: str, cache_root: Path | None, order: np.ndarray | None):
    """Entries of a folder, CSV, plain tar or Hugging Face dataset, in `order` (None: as listed)."""
    path = Path(spec).expanduser()
    plain_tar = path.is_file() and path.name.lower().endswith(".tar") and not _is_compressed(path)
    if plain_tar and not looks_like_shard(path):
        return _plain_tar_entries(path)
    src = open_stream_source(spec, cache_dir=cache_root, progress=False)
    if src.read is None:
        return None
    rows = range(len(src))

    def entries(order: np.ndarray | None) -> Iterator[Entry]:
        for i in rows if order is None else order:
            name, data = src.read(int(i))
            yield name, int(src.labels[i]), lambda data=data: _read_bytes(data)

    return src.classes, len(src), entries


def _plain_tar_entries(path: Path):
    """An uncompressed ImageFolder tar read at random: every image member's offset from one pass over the headers."""
    with tarfile.open(path, "r:") as tf:
        members = [m for m in tf if m.isfile() and is_image_name(m.name)]
    where = f"archive '{path}'"
    parts = [tuple(p for p in m.name.split("/") if p not in ("", ".")) for m in members]
    folders, classes = class_of_paths(parts, where)
    keep = [(m, f) for m, f in zip(members, folders) if f is not None]
    index = {c: i for i, c in enumerate(classes)}

    def entries(order: np.ndarray | None) -> Iterator[Entry]:
        with open(path, "rb") as f:
            for i in range(len(keep)) if order is None else order:
                m, folder = keep[int(i)]

                def read(m=m) -> bytes:
                    f.seek(m.offset_data)
                    return f.read(m.size)

                yield m.name, index[folder], read

    return classes, len(keep), entries


def _in_order_entries(spec: str, cache_root: Path | None):
    """Entries of tar shards or a compressed tar, in their own order."""
    src = open_stream_source(spec, cache_dir=cache_root, progress=False)
    index = src.index

    def entries(order: None) -> Iterator[Entry]:
        gid = 0
        for shard in index.shards:
            for s in iter_samples(shard, index.layout, wanted=lambda j: True):
                name = f"{shard.name}:{s.key}.{s.image_ext}"
                yield name, int(src.labels[gid]), lambda data=s.image: data or b""
                gid += 1

    return src.classes, len(src), entries, list(src.skipped)


def _kept_format(data: bytes) -> str | None:
    """The shard extension of bytes a shard reader takes as they are (by their magic number, not their name)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _encoded(name: str, read: Callable[[], bytes]) -> tuple[str, bytes]:
    """(extension, bytes) as the shard stores the image: its own bytes for JPEG/PNG/WebP, PNG for the rest."""
    data = read()
    if not data:
        raise ImageDecodeError(f"image '{name}' is empty (0 bytes)")
    ext = _kept_format(data)
    if ext is not None:
        return ext, data
    buf = io.BytesIO()
    Image.fromarray(decode_image(data, name=name)).save(buf, format="PNG")
    return "png", buf.getvalue()


def _member_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512


class _ShardFiles:
    """Shards OUT/PREFIX-000000.tar, ... each written atomically and closed before it passes `max_size` bytes."""

    def __init__(self, out: Path, prefix: str, max_size: int, max_count: int | None):
        self.out, self.prefix, self.max_size, self.max_count = out, prefix, max_size, max_count
        self.written: list[Path] = []
        self._ctx = self._file = self._tar = None
        self.size = self.count = 0

    def _open(self) -> None:
        path = self.out / f"{self.prefix}-{len(self.written):06d}.tar"
        self._ctx = atomic_write(path)
        tmp = self._ctx.__enter__()
        self._file = open(tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.written.append(path)
        self.size = self.count = 0

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._ctx.__exit__(None, None, None)
            self._tar = None

    def abort(self, exc: BaseException) -> None:
        """Remove what this run wrote (a rerun then starts in an empty folder), the shard being written included."""
        if self._tar is not None:
            self._file.close()
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)  # removes the temp file
            self._tar = None
            self.written.pop()
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written = []

    def add(self, members: list[tuple[str, bytes]]) -> None:
        need = sum(_member_bytes(len(d)) for _, d in members)
        full = self.count and (self.size + need + TAR_END > self.max_size or self.count == self.max_count)
        if self._tar is None or full:
            self.close()
            self._open()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: the same input, the same bytes
            self._tar.addfile(info, io.BytesIO(data))
        self.size += need
        self.count += 1


def _sidecar_classes(out: Path, classes: list[str]) -> tuple[list[str], np.ndarray | None]:
    """The classes to write: an existing OUT/classes.json's (this source's labels mapped onto it), else ours."""
    existing, _ = read_sidecar([out / "x.tar"])
    if existing is None or existing == classes:
        return classes, None
    missing = [c for c in classes if c not in existing]
    if missing:
        raise DataSourceError(
            f"{out / CLASSES_FILE} names other classes (this source has {missing[:5]} too); write into another folder"
        )
    return existing, np.array([existing.index(c) for c in classes], dtype=np.int64)


def write_shards(
    source: str,
    out: str | Path,
    *,
    max_size: int = 10**9,
    max_count: int | None = None,
    prefix: str = "train",
    shuffle: bool = True,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ShardWriteReport:
    """Write `source` (folder, tar, CSV, shards or a Hugging Face dataset) as shards in `out` (see the module).

    Raises:
        DataSourceError: unreadable source, no sample, or shards with this prefix already in `out`.
        ValueError: max_size below one sample's worth, or max_count < 1.
    """
    from tqdm.auto import tqdm

    out = Path(out).expanduser()
    if max_count is not None and max_count < 1:
        raise ValueError(f"--max-count must be >= 1, got {max_count}")
    if max_size < 2 * TAR_END:
        raise ValueError(f"--max-size {max_size} is too small for a shard; give at least a few MB, e.g. 100MB")
    if any(out.glob(f"{prefix}-*.tar")):
        raise DataSourceError(f"'{out}' already holds {prefix}-*.tar shards; write elsewhere or pass --prefix")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else None
    skipped: list[tuple[str, str]] = []
    found = _random_access_entries(source, cache_root, None)
    if found is not None:
        classes, n, entries = found
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        stream, shuffled = entries(order), shuffle
    else:
        classes, n, entries, skipped = _in_order_entries(source, cache_root)
        stream, shuffled = entries(None), False
        if shuffle:
            log.warning("%s is read in its own order (a compressed tar or shards): the shards keep that order", source)
    classes, remap = _sidecar_classes(out, classes)
    files = _ShardFiles(out, prefix, max_size, max_count)
    written = 0
    try:
        for name, label, read in tqdm(stream, total=n, desc="sharding", unit="img", disable=not progress):
            try:
                ext, data = _encoded(name, read)
            except (ImageDecodeError, OSError) as e:
                skipped.append((name, str(e)))
                continue
            key = f"{written:08d}"
            label = int(remap[label]) if remap is not None else label
            meta = json.dumps({"path": name}).encode()
            files.add([(f"{key}.{ext}", data), (f"{key}.cls", str(label).encode()), (f"{key}.json", meta)])
            written += 1
        files.close()
    except BaseException as e:
        files.abort(e)
        raise
    if not written:
        raise DataSourceError(f"{source}: no image could be written; e.g. {skipped[:3]}")
    atomic_write_bytes(out / CLASSES_FILE, json.dumps({"classes": classes}, indent=1).encode())
    last = len(files.written) - 1
    pattern = str(out / f"{prefix}-{{000000..{last:06d}}}.tar") if last else str(files.written[0])
    return ShardWriteReport(files.written, written, classes, pattern, shuffled, skipped)


__all__ = ["ShardWriteReport", "write_shards"]
