"""Data sources: folder, tar.gz, CSV, digits, cifar (offline), the decode cache, splits and bad files."""

import io
import os
import tarfile
import time
import urllib.error

import numpy as np
import pytest
from PIL import Image

from vitkit.data import sources
from vitkit.data.sources import DataSourceError, align_classes, load_source, stratified_split

CLASSES = ["cat", "dog", "fox"]


def _png_bytes(color, size=(12, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _make_folder(root, per_class=3, size=(12, 10)):
    """root/<class>/<i>.png with a class-specific colour; returns the root."""
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(_png_bytes((60 * ci, 10 * i, 200), size))
    return root


def test_folder_source_labels_classes_and_pixels(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    (root / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    ds = load_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes == CLASSES
    assert ds.images.shape == (9, 10, 12, 3) and ds.images.dtype == np.uint8  # (N, H, W, C); PIL size is (W, H)
    assert ds.labels.dtype == np.int64 and sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for img, lab in zip(ds.images, ds.labels):
        assert img[0, 0, 0] == 60 * lab  # the pixels belong to the label they came with
    assert ds.skipped == []  # .txt and hidden files are ignored silently, not "skipped"


def test_tar_gz_source_finds_class_level_without_unpacking(tmp_path):
    tar_path = tmp_path / "data.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for ci, c in enumerate(CLASSES):
            for i in range(2):
                data = _png_bytes((60 * ci, 0, 0))
                info = tarfile.TarInfo(f"export/train/{c}/{i}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        readme = b"hello"
        info = tarfile.TarInfo("export/README.txt")
        info.size = len(readme)
        tf.addfile(info, io.BytesIO(readme))
    before = set(os.listdir(tmp_path))
    ds = load_source(str(tar_path), cache_dir=tmp_path / "cache", progress=False)
    assert set(os.listdir(tmp_path)) - before == {"cache"}  # nothing extracted next to the archive
    assert ds.classes == CLASSES and len(ds) == 6
    assert [int(ds.images[i, 0, 0, 0]) for i in range(6)] == [60 * int(lab) for lab in ds.labels]


def test_csv_source_names_ints_header_and_missing_files(tmp_path):
    root = _make_folder(tmp_path / "imgs", per_class=2)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\nimgs/cat/0.png,cat\nimgs/dog/0.png,dog\nimgs/dog/1.png,dog\nimgs/gone.png,cat\n")
    ds = load_source(str(csv_path), cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1, 1]
    assert [name for name, _ in ds.skipped] == ["imgs/gone.png"]

    int_csv = tmp_path / "ints.csv"  # no header, integer labels are class indices
    int_csv.write_text(f"{root}/cat/0.png,2\nimgs/dog/1.png,0\n")
    ds = load_source(str(int_csv), cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes == ["0", "1", "2"] and ds.labels.tolist() == [2, 0]

    with pytest.raises(DataSourceError, match="not among"):
        load_source(str(csv_path), cache_dir=tmp_path / "cache", progress=False, classes=["cat", "bird"])
    bad = tmp_path / "bad.csv"
    bad.write_text("imgs/cat/0.png\n")
    with pytest.raises(DataSourceError, match="path,label"):
        load_source(str(bad), cache_dir=tmp_path / "cache", progress=False)


def test_digits_source():
    ds = load_source("digits", progress=False)
    assert ds.images.shape == (1797, 8, 8, 1) and ds.images.dtype == np.uint8
    assert ds.images.max() == 255 and ds.images.min() == 0  # 0..16 scaled to 0..255
    assert ds.classes == [str(i) for i in range(10)] and set(ds.labels.tolist()) == set(range(10))


def test_cifar10_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    import torchvision.datasets

    class OfflineCIFAR:
        def __init__(self, root, train=True, download=False):
            if not download:
                raise RuntimeError("Dataset not found or corrupted.")
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR)
    start = time.perf_counter()
    with pytest.raises(DataSourceError) as err:
        load_source("cifar10", cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - start < 5
    assert "--data path/to/folder-or-tar" in str(err.value) and "offline" in str(err.value)


def test_decode_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "imgs")
    calls = []
    real = sources.decode_image
    monkeypatch.setattr(sources, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 9 and not first.from_cache
    second = load_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 9 and second.from_cache  # no decoding the second time
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(second.images), np.asarray(first.images))
    assert second.labels.tolist() == first.labels.tolist() and second.classes == first.classes
    (root / "dog" / "new.png").write_bytes(_png_bytes((1, 2, 3)))  # a changed folder is decoded again
    third = load_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    assert not third.from_cache and len(third) == 10
    resized = load_source(str(root), cache_dir=tmp_path / "cache", progress=False, image_size=6)
    assert resized.images.shape[1:] == (6, 6, 3) and not resized.from_cache  # the size is part of the key


def test_mixed_sizes_become_the_most_common_size(tmp_path):
    root = _make_folder(tmp_path / "imgs", size=(12, 10))
    (root / "fox" / "big.png").write_bytes(_png_bytes((0, 0, 0), size=(40, 30)))
    ds = load_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    assert ds.images.shape == (10, 10, 12, 3)


def test_stratified_split_is_seeded_and_stratified():
    labels = np.repeat(np.arange(4), [100, 50, 20, 10])
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    assert np.bincount(labels[va]).tolist() == [20, 10, 4, 2]  # each class keeps its share
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    _, va3 = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(va, va3)


def test_empty_and_flat_and_mismatched_data_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataSourceError, match="no image files"):
        load_source(str(empty), cache_dir=tmp_path / "cache", progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(_png_bytes((1, 1, 1)))
    with pytest.raises(DataSourceError, match="one subfolder per class"):
        load_source(str(flat), cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DataSourceError, match="does not exist"):
        load_source(str(tmp_path / "nope"), cache_dir=tmp_path / "cache", progress=False)
    train = load_source(str(_make_folder(tmp_path / "train")), cache_dir=tmp_path / "cache", progress=False)
    val_root = tmp_path / "val"
    (val_root / "dog").mkdir(parents=True)
    (val_root / "fox").mkdir()
    for c in ("dog", "fox"):
        (val_root / c / "0.png").write_bytes(_png_bytes((5, 5, 5)))
    val = load_source(str(val_root), cache_dir=tmp_path / "cache", progress=False, classes=train.classes)
    assert val.classes == CLASSES and val.labels.tolist() == [1, 2]  # a subset maps onto the training indices
    (val_root / "wolf").mkdir()
    (val_root / "wolf" / "0.png").write_bytes(_png_bytes((5, 5, 5)))
    with pytest.raises(DataSourceError, match="wolf"):
        align_classes(load_source(str(val_root), cache_dir=tmp_path / "cache", progress=False), train.classes)


def test_bad_files_are_skipped_named_and_odd_formats_convert(tmp_path, caplog):
    root = _make_folder(tmp_path / "imgs", per_class=2, size=(16, 16))
    good = root / "cat"
    # converted, not skipped: CMYK JPEG, 16-bit PNG, palette PNG with transparency, grayscale, RGBA
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(good / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(good / "deep.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(good / "palette.png", transparency=0)
    Image.new("L", (16, 16), 128).save(good / "gray.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(good / "rgba.png")
    # broken: truncated JPEG, zero bytes, HTML named .jpg
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "fox" / "page.jpg").write_text("<html><body>404 not found</body></html>")
    (root / "fox" / "labels.txt").write_text("fox")
    os.symlink(root, root / "fox" / "loop")  # a symlink loop must not hang the walk
    with caplog.at_level("WARNING", logger="vitkit.data"):
        ds = load_source(str(root), cache_dir=tmp_path / "cache", progress=False)
    assert sorted(name for name, _ in ds.skipped) == ["dog/empty.jpg", "dog/truncated.jpg", "fox/page.jpg"]
    reasons = dict(ds.skipped)
    assert "empty" in reasons["dog/empty.jpg"] and "truncated" in reasons["dog/truncated.jpg"]
    assert "not an image" in reasons["fox/page.jpg"]
    assert "skipped 3" in caplog.text
    assert ds.classes == CLASSES
    assert len(ds) == 6 + 5  # 2 per class + 5 converted, each once despite the loop
    assert ds.images.shape[1:] == (16, 16, 3)
    assert np.bincount(ds.labels).tolist() == [7, 2, 2]


def test_parallel_decoding_keeps_order_and_skips(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "imgs", per_class=5)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    serial = load_source(str(root), cache_dir=tmp_path / "c1", progress=False)
    monkeypatch.setattr(sources, "DECODE_CHUNK", 2)  # many small chunks -> the forked worker pool runs
    monkeypatch.setenv("VITKIT_DECODE_WORKERS", "2")
    parallel = load_source(str(root), cache_dir=tmp_path / "c2", progress=False)
    np.testing.assert_array_equal(np.asarray(parallel.images), np.asarray(serial.images))
    assert parallel.labels.tolist() == serial.labels.tolist()
    assert [n for n, _ in parallel.skipped] == ["dog/broken.png"] == [n for n, _ in serial.skipped]
