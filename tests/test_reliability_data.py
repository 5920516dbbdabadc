"""Data sources under stress: archives and CSVs holding the bad-input corpus, truncated archives, odd CSVs, and a
decode cache that is damaged or cannot be written. Bad items are skipped and named; the rest loads."""

from __future__ import annotations

import errno
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vitkit.data import sources
from vitkit.data.sources import DataSourceError, load_source

from .badinput import make_cases

CASES = make_cases()
GOOD = [c for c in CASES if c.ok]
BAD = [c for c in CASES if not c.ok]


def corpus_tar(path: Path, compress: bool = True) -> Path:
    """Two classes, each holding every good and every bad corpus file (plus a few entries that are not files)."""
    with tarfile.open(path, "w:gz" if compress else "w") as tf:
        for cls in ("a", "b"):
            for c in CASES:
                info = tarfile.TarInfo(f"data/{cls}/{c.name}")
                info.size = len(c.data)
                tf.addfile(info, io.BytesIO(c.data))
            link = tarfile.TarInfo(f"data/{cls}/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/dev/zero"  # never followed out of the archive
            tf.addfile(link)
        folder = tarfile.TarInfo("data/a/folder.jpg")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
    return path


@pytest.mark.timeout(60)
def test_tar_with_the_corpus_skips_and_names_bad_members(tmp_path):
    ds = load_source(
        str(corpus_tar(tmp_path / "corpus.tar.gz")), cache_dir=tmp_path / "c", image_size=8, progress=False
    )
    assert len(ds) == 2 * len(GOOD) and ds.classes == ["a", "b"]
    assert np.bincount(ds.labels).tolist() == [len(GOOD), len(GOOD)]
    skipped = dict(ds.skipped)
    assert set(skipped) == {f"data/{cls}/{c.name}" for cls in "ab" for c in BAD}
    for c in BAD:
        assert re.search(c.reason, skipped[f"data/a/{c.name}"], re.IGNORECASE)


@pytest.mark.timeout(60)
def test_truncated_archive_is_a_clear_error(tmp_path):
    data = corpus_tar(tmp_path / "full.tar.gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match=r"cut.tar.gz.*could not be read.*complete tar"):
        load_source(str(cut), cache_dir=tmp_path / "c", progress=False)
    not_tar = tmp_path / "html.tar"
    not_tar.write_bytes(b"<html>404</html>")
    with pytest.raises(DataSourceError, match="html.tar"):
        load_source(str(not_tar), cache_dir=tmp_path / "c", progress=False)


@pytest.mark.timeout(60)
def test_csv_with_bad_rows_and_bad_files(tmp_path):
    for c in CASES:
        (tmp_path / c.name).write_bytes(c.data)
    rows = [f"{c.name},{i % 2}" for i, c in enumerate(CASES)]
    rows += ["missing.png,0", "/dev/zero,1", f"{tmp_path},0"]  # absent, a device, a directory
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    ds = load_source(str(tmp_path / "list.csv"), cache_dir=tmp_path / "c", image_size=8, progress=False)
    assert len(ds) == len(GOOD)
    skipped = dict(ds.skipped)
    assert len(skipped) == len(BAD) + 3
    assert "does not exist" in skipped["missing.png"]
    assert "not a regular file" in skipped["/dev/zero"]
    assert "directory" in skipped[str(tmp_path)]

    bad_csvs = {
        "short_row.csv": ("path,label\na.png\n", r"row 1 .* is not 'path,label'"),
        "empty.csv": ("", "has no rows"),
        "negative.csv": ("a.png,-1\n", "negative label"),
        "id_column.csv": ("a.png,123456789012\n", "over a million classes"),
        "latin1.csv": (None, "could not be read"),
    }
    for name, (content, message) in bad_csvs.items():
        path = tmp_path / name
        if content is None:
            path.write_bytes("caf\xe9.png,1\n".encode("latin-1"))
        else:
            path.write_text(content)
        with pytest.raises(DataSourceError, match=message):
            load_source(str(path), cache_dir=tmp_path / "c", progress=False)


def _folder(tmp_path: Path) -> Path:
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for c in GOOD[:4]:
            (tmp_path / "data" / cls / c.name).write_bytes(c.data)
    return tmp_path / "data"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["truncated_images", "broken_meta", "missing_labels"])
def test_a_damaged_decode_cache_is_decoded_again(tmp_path, damage):
    data = _folder(tmp_path)
    first = load_source(str(data), cache_dir=tmp_path / "c", image_size=8, progress=False)
    cache = Path(first.cache_path)
    expected = np.array(first.images)  # a copy: first.images maps the very file damaged below
    del first.images
    if damage == "truncated_images":
        blob = (cache / "images.npy").read_bytes()
        (cache / "images.npy").write_bytes(blob[: len(blob) // 2])
    elif damage == "broken_meta":
        (cache / "meta.json").write_text("{not json")
    else:
        (cache / "labels.npy").unlink()
    for attempt in range(2):  # decoded again, then read from the rewritten cache
        ds = load_source(str(data), cache_dir=tmp_path / "c", image_size=8, progress=False)
        assert ds.from_cache == bool(attempt)
        assert np.array_equal(np.asarray(ds.images), expected)
        assert np.array_equal(ds.labels, first.labels)


@pytest.mark.timeout(60)
def test_a_full_disk_for_the_decode_cache_keeps_the_images_in_memory(tmp_path, monkeypatch, caplog):
    data = _folder(tmp_path)

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sources.np.lib.format, "open_memmap", full_disk)
    ds = load_source(str(data), cache_dir=tmp_path / "c", image_size=8, progress=False)
    assert len(ds) == 8 and ds.images.shape == (8, 8, 8, 3)
    assert "could not write the decode cache" in caplog.text and "No space left" in caplog.text
    assert not list((tmp_path / "c" / "decoded").glob("*.tmp-*")), "a temp folder was left behind"
