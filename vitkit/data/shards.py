"""WebDataset-style tar shards: find them, read their samples in order, and index them once.

A shard set is named by one pattern: `shards/train-{000000..000099}.tar` (brace expansion, as webdataset and timm
write it), a glob (`shards/*.tar`), or one tar file. Two layouts are read:

  * `wds`: each sample is a run of members sharing a key (the path up to the first dot of the file name):
    an image (`jpg`, `jpeg`, `png` or `webp`) and a label (`cls`: a class index or name; `json`: an object with
    `label`, `cls` or `class`, or a bare value; `txt`: a class name), checked in that order;
  * `folder`: an ImageFolder archive (`<class>/img.jpg`), each image its own sample, labelled by its class folder.

Class names come from a sidecar `classes.json` beside the shards (`{"classes": [...]}`, as `vitkit shard` writes
it) when there is one; otherwise integer labels name classes `0..K-1` and text labels are sorted.

The index (sample count per shard, every sample's label and encoded size) is built by one pass over the shards:
an uncompressed shard is read header by header, seeking over the image bytes, so this costs little; it is kept in
the cache folder, keyed by the shards' paths, sizes and modification times. A sample without an image or a label,
and the part of a shard after a truncation, are left out of the index and named in `skipped`, so the streaming
reader never meets them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_write, atomic_write_bytes
from .listing import DataSourceError, Listing, class_of_paths, is_image_name

log = logging.getLogger("vitkit.data")

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "json", "txt")  # in the order a label is taken when a sample has several
JSON_LABEL_KEYS = ("label", "cls", "class")
CLASSES_FILE = "classes.json"  # the sidecar naming the classes of the shards beside it
INDEX_VERSION = 1  # bump when the index layout or the reading rules change
MAX_CLASSES = 1_000_000  # more label values than this are captions or ids, not classes
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


# ------------------------------------------------------------------------------------------------- names
def _has_braces(spec: str) -> bool:
    return "{" in spec and "}" in spec


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def is_shard_pattern(spec: str) -> bool:
    """True when `spec` names several tar files at once: brace expansion or a glob ending in a tar suffix."""
    text = spec.strip()
    return _is_tar_name(text.rstrip("}")) and (_has_braces(text) or any(c in text for c in "*?["))


def expand_pattern(spec: str, what: str = "shard") -> list[Path]:
    """The files `spec` names, in the pattern's order: brace expansion (`{000000..000099}`, `{a,b}`), then globs
    (sorted), else the path itself. `what` names the files in messages.

    Raises:
        DataSourceError: the pattern names no file, or names files that do not exist (the first few are listed).
    """
    text = spec.strip()
    names = [text]
    if _has_braces(text):
        from ..optional import require

        names = list(require("braceexpand", f"a brace pattern of {what}s ({{000000..000099}})").braceexpand(text))
    paths: list[Path] = []
    for name in names:
        if any(c in name for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(name)))
            if not found:
                raise DataSourceError(f"{what} pattern '{name}' matches no file")
            paths.extend(Path(p) for p in found)
        else:
            paths.append(Path(name).expanduser())
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataSourceError(
            f"{what} pattern '{spec}': {len(missing)} of {len(paths)} {what}(s) do not exist, e.g. {missing[:3]}; "
            "check the folder and the range in braces"
        )
    return paths


def expand_shards(spec: str) -> list[Path]:
    """The tar shards `spec` names (see `expand_pattern`)."""
    return expand_pattern(spec, "shard")


def _split_key(name: str) -> tuple[str, str]:
    """`dir/0001.seg.jpg` -> (`dir/0001`, `seg.jpg`): the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _member_is_hidden(name: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in name.split("/") if p not in ("", "."))


def detect_layout(path: Path, probe: int = 64) -> str:
    """`wds` when one of the first `probe` members' keys has both an image and a label, else `folder`."""
    seen: dict[str, set[str]] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for n, m in enumerate(tf):
                if n >= probe:
                    break
                if m.isfile() and not _member_is_hidden(m.name):
                    key, ext = _split_key(m.name)
                    seen.setdefault(key, set()).add(ext)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataSourceError(f"shard '{path}' could not be read ({e}); check that it is a complete tar") from None
    exts = seen.values()
    return "wds" if any(e & set(SHARD_IMAGE_EXTS) and e & set(LABEL_EXTS) for e in exts) else "folder"


def looks_like_shard(path: Path) -> bool:
    """Whether a single tar file holds WebDataset samples (image + label members) rather than class folders."""
    try:
        return detect_layout(path) == "wds"
    except DataSourceError:
        return False


# ------------------------------------------------------------------------------------------------ samples
@dataclass
class ShardSample:
    """One valid sample of a shard, in archive order."""

    index: int  # its number among the shard's valid samples
    key: str
    label: str  # wds: the label text; folder: the member's path (its class folder is found by the index)
    image_ext: str
    image_size: int  # bytes of the encoded image
    image: bytes | None  # the encoded image, when it was wanted


def _parse_label(ext: str, data: bytes) -> str:
    """A label member's content as text: a class index or a class name. Raises ValueError when it holds none."""
    text = data.decode("utf-8").strip()
    if ext == "json":
        value = json.loads(text)
        if isinstance(value, dict):
            value = next((value[k] for k in JSON_LABEL_KEYS if k in value), None)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"the json holds no label ({'/'.join(JSON_LABEL_KEYS)}: an int or a name)")
        text = str(value).strip()
    if not text:
        raise ValueError("the label is empty")
    return text


class _Group:
    """The members of one key seen so far: the image member (its bytes when wanted) and the label."""

    def __init__(self, key: str):
        self.key, self.image_ext, self.image_size, self.image = key, "", 0, None
        self.label: str | None = None
        self.label_error: str | None = None
        self.label_rank = len(LABEL_EXTS)


def _check_complete(m: tarfile.TarInfo, file_size: int | None) -> None:
    """An uncompressed shard whose member claims bytes past the end of the file was cut short."""
    if file_size is not None and m.offset_data + m.size > file_size:
        raise tarfile.ReadError(f"member '{m.name}' ends past the end of the file (truncated)")


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6).startswith(_COMPRESSED_MAGIC)


def iter_samples(
    path: Path,
    layout: str,
    *,
    wanted: Callable[[int], bool] = lambda j: False,
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[ShardSample]:
    """The valid samples of one shard in archive order; `wanted(j)` says whether sample j's image bytes are read.

    Samples without an image or a readable label are not yielded (nor counted) and are named in `skipped`; so is
    a truncated or damaged shard, which ends at the last complete sample before the damage. The index and the
    streaming reader both read through here, so they agree on which sample is number j.
    """
    skipped = skipped if skipped is not None else []
    file_size = None if _is_compressed(path) else os.path.getsize(path)
    count = 0
    group: _Group | None = None

    def close(g: _Group) -> ShardSample | None:
        nonlocal count
        where = f"{path.name}:{g.key}"
        if not g.image_ext:
            skipped.append((where, f"no image ({'/'.join(SHARD_IMAGE_EXTS)}) in the sample"))
        elif g.label is None:
            reason = g.label_error or f"no label ({'/'.join(LABEL_EXTS)}) in the sample"
            skipped.append((where, reason))
        else:
            count += 1
            return ShardSample(count - 1, g.key, g.label, g.image_ext, g.image_size, g.image)
        return None

    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile() or _member_is_hidden(m.name):
                    continue
                if layout == "folder":
                    _check_complete(m, file_size)
                    if is_image_name(m.name):
                        f = tf.extractfile(m) if wanted(count) else None
                        data = f.read() if f is not None else None
                        count += 1
                        stem, _, ext = m.name.rpartition(".")
                        yield ShardSample(count - 1, stem, m.name, ext.lower(), m.size, data)
                    continue
                key, ext = _split_key(m.name)
                if group is not None and key != group.key:
                    done = close(group)
                    group = None
                    if done is not None:
                        yield done
                _check_complete(m, file_size)  # after closing the sample before it: that one is complete
                group = group or _Group(key)
                _add_member(tf, m, ext, group, wanted(count))
        if group is not None:
            done = close(group)
            if done is not None:
                yield done
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # the sample being read when the damage showed cannot be known complete: it is dropped with the rest
        skipped.append((path.name, f"shard truncated or damaged after {count} sample(s) ({e})"))


def _add_member(tf: tarfile.TarFile, m: tarfile.TarInfo, ext: str, group: _Group, want_image: bool) -> None:
    """Note member `m` in its sample's group: the first image member, and the best-ranked label member."""
    if ext in SHARD_IMAGE_EXTS and not group.image_ext:
        group.image_ext, group.image_size = ext, m.size
        if want_image:
            f = tf.extractfile(m)
            group.image = f.read() if f is not None else b""
    elif ext in LABEL_EXTS and LABEL_EXTS.index(ext) < group.label_rank:
        f = tf.extractfile(m)
        try:
            group.label = _parse_label(ext, f.read() if f is not None else b"")
            group.label_rank, group.label_error = LABEL_EXTS.index(ext), None
        except (ValueError, UnicodeDecodeError) as e:
            group.label_error = f"unreadable {ext} label ({e})"


# -------------------------------------------------------------------------------------------------- index
@dataclass
class ShardIndex:
    """What the streaming reader needs to know of a shard set before reading it: counts, labels, classes."""

    shards: list[Path]
    layout: str  # "wds" or "folder"
    counts: np.ndarray  # (S,) valid samples per shard
    labels: np.ndarray  # (N,) class index of every valid sample, shard after shard
    image_bytes: np.ndarray  # (N,) encoded size of every image
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def starts(self) -> np.ndarray:
        """(S + 1,) the global number of each shard's first sample, and the total at the end."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def description(self) -> str:
        first, last = self.shards[0], self.shards[-1]
        return f"{len(self.shards)} tar shard(s) {first}" + (f" .. {last.name}" if len(self.shards) > 1 else "")


def _fingerprint(shards: Sequence[Path], layout: str, sidecar: bytes | None) -> str:
    h = hashlib.sha256(repr((INDEX_VERSION, layout)).encode())
    for p in shards:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    h.update(sidecar or b"")
    return h.hexdigest()[:16]


def read_sidecar(shards: Sequence[Path]) -> tuple[list[str] | None, bytes | None]:
    """The class names of `classes.json` beside the first shard (and its bytes, for the fingerprint), or None."""
    path = shards[0].parent / CLASSES_FILE
    if not path.is_file():
        return None, None
    raw = path.read_bytes()
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise DataSourceError(f"'{path}' is not valid JSON ({e}); it should hold {{\"classes\": [names...]}}") from None
    names = value.get("classes") if isinstance(value, dict) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DataSourceError(f"'{path}' should hold {{\"classes\": [name, ...]}}, a non-empty list of class names")
    return [str(n) for n in names], raw


def _classes_for(raw: list[str], sidecar: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """Map raw label texts to class indices: through the sidecar's names, else integers as indices, else names."""
    if sidecar is not None:
        index = {n: i for i, n in enumerate(sidecar)}
        out = []
        for r in raw:
            i = int(r) if r.lstrip("-").isdigit() else index.get(r)
            if i is None or not 0 <= i < len(sidecar):
                raise DataSourceError(
                    f"{where}: label '{r}' is not one of the {len(sidecar)} classes of {CLASSES_FILE} "
                    f"({sidecar[:5]}{' ...' if len(sidecar) > 5 else ''})"
                )
            out.append(i)
        return np.asarray(out, dtype=np.int64), list(sidecar)
    if all(r.isdigit() for r in raw):
        labels = np.asarray([int(r) for r in raw], dtype=np.int64)
        k = int(labels.max()) + 1 if len(labels) else 0
        if k > MAX_CLASSES:
            raise DataSourceError(f"{where}: label {k - 1} means over a million classes; cls must be a class index")
        return labels, [str(i) for i in range(k)]
    names = sorted(set(raw))
    if len(names) > MAX_CLASSES:
        raise DataSourceError(f"{where}: {len(names):,} distinct labels look like captions, not classes")
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[r] for r in raw], dtype=np.int64), names


def scan_shards(shards: Sequence[Path], layout: str, progress: bool = False) -> ShardIndex:
    """Read every shard once (headers and labels only) into a ShardIndex."""
    from tqdm.auto import tqdm

    raw: list[str] = []
    sizes: list[int] = []
    counts: list[int] = []
    skipped: list[tuple[str, str]] = []
    for path in tqdm(shards, desc="indexing shards", unit="shard", disable=not progress, leave=False):
        n = 0
        for s in iter_samples(path, layout, skipped=skipped):
            raw.append(s.label)
            sizes.append(s.image_size)
            n += 1
        counts.append(n)
    where = f"shards '{shards[0]}'" + (f" .. '{shards[-1].name}'" if len(shards) > 1 else "")
    if not raw:
        raise DataSourceError(f"{where}: no sample with an image and a label; e.g. {skipped[:3]}")
    if layout == "folder":
        parts = [tuple(p for p in r.split("/") if p not in ("", ".")) for r in raw]
        folders, classes = class_of_paths(parts, where)
        if any(f is None for f in folders):  # images above the class level: not samples of any class
            raise DataSourceError(f"{where}: images lie above the class folders; put each in a <class>/ folder")
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[f] for f in folders], dtype=np.int64)
    else:
        labels, classes = _classes_for(raw, read_sidecar(shards)[0], where)
    return ShardIndex(
        list(shards), layout, np.asarray(counts, np.int64), labels, np.asarray(sizes, np.int64), classes, skipped
    )


def load_shard_index(shards: Sequence[Path], cache_root: Path, progress: bool = True) -> ShardIndex:
    """The index of `shards`, from the cache folder when the shards are unchanged, else scanned and cached."""
    layout = detect_layout(shards[0])
    _, sidecar = read_sidecar(shards)
    key = _fingerprint(shards, layout, sidecar)
    folder = cache_root / "shard-index" / f"{shards[0].stem}-{key}"
    if (folder / "meta.json").is_file():
        try:
            return _read_index(folder, shards, key)
        except (OSError, ValueError, KeyError) as e:
            log.warning("shard index %s is unreadable (%s); indexing again", folder, e)
    index = scan_shards(shards, layout, progress)
    index.fingerprint = key
    if index.skipped:
        shown = "; ".join(f"{n} ({r})" for n, r in index.skipped[:3])
        log.warning("%s: skipped %d sample(s): %s", index.description, len(index.skipped), shown)
    try:
        with atomic_write(folder / "arrays.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, counts=index.counts, labels=index.labels, image_bytes=index.image_bytes)
        meta = {"layout": layout, "classes": index.classes, "skipped": [list(s) for s in index.skipped]}
        atomic_write_bytes(folder / "meta.json", json.dumps(meta).encode())
    except OSError as e:
        log.warning("could not write the shard index to %s (%s); it will be built again next time", folder, e)
    return index


def _read_index(folder: Path, shards: Sequence[Path], key: str) -> ShardIndex:
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "arrays.npz") as z:
        counts, labels, sizes = z["counts"], z["labels"], z["image_bytes"]
    if len(counts) != len(shards) or int(counts.sum()) != len(labels):
        raise ValueError("counts do not match the shards")
    skipped = [tuple(s) for s in meta["skipped"]]
    return ShardIndex(list(shards), meta["layout"], counts, labels, sizes, list(meta["classes"]), skipped, key)


# ------------------------------------------------------------------------------------- the decode cache
def shard_listing(index: ShardIndex) -> Listing:
    """Every valid sample's image bytes, in index order, for the decode cache (`load_source` on a small set)."""

    def stream() -> Iterator[tuple[str, bytes]]:
        for path in index.shards:
            for s in iter_samples(path, index.layout, wanted=lambda j: True):
                yield f"{path.name}/{s.key}.{s.image_ext}", s.image or b""

    labels = index.labels.tolist()
    return Listing(index.description, stream(), lambda: (labels, index.classes), len(labels))


__all__ = [
    "CLASSES_FILE",
    "ShardIndex",
    "ShardSample",
    "detect_layout",
    "expand_pattern",
    "expand_shards",
    "is_shard_pattern",
    "iter_samples",
    "load_shard_index",
    "looks_like_shard",
    "read_sidecar",
    "scan_shards",
    "shard_listing",
]
