"""vitkit.files: the one atomic write. Readers see the old file or the whole new one, with the permissions a plain
`open(path, "w")` would give, and a failed write leaves no temp file behind."""

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from vitkit.files import atomic_write, atomic_write_bytes


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_a_new_file_gets_the_permissions_of_a_plain_write(tmp_path, umask):
    with open(tmp_path / "plain.bin", "w") as f:
        f.write("x")
    atomic_write_bytes(tmp_path / "atomic.bin", b"x")
    with atomic_write(tmp_path / "by_path.bin") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "atomic.bin") == _mode(tmp_path / "plain.bin") == 0o666 & ~umask
    assert _mode(tmp_path / "by_path.bin") == 0o666 & ~umask


@pytest.mark.parametrize("old_mode", [0o600, 0o640, 0o664])
def test_a_replaced_file_keeps_its_mode_like_a_plain_write(tmp_path, umask, old_mode):
    for name in ("plain.bin", "atomic.bin"):
        (tmp_path / name).write_bytes(b"old")
        os.chmod(tmp_path / name, old_mode)
    with open(tmp_path / "plain.bin", "w") as f:
        f.write("new")
    atomic_write_bytes(tmp_path / "atomic.bin", b"new")
    assert _mode(tmp_path / "atomic.bin") == _mode(tmp_path / "plain.bin") == old_mode
    assert (tmp_path / "atomic.bin").read_bytes() == b"new"


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old, complete")
    with pytest.raises(RuntimeError, match="exporter crashed"), atomic_write(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("exporter crashed")
    assert target.read_bytes() == b"old, complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_full_disk_names_the_target_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")  # as os.write raises it: no filename

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left") as info:
        atomic_write_bytes(target, b"new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_temp_path_keeps_the_suffix_for_writers_that_choose_by_extension(tmp_path):
    with atomic_write(tmp_path / "cache" / "images.npy") as tmp:  # np.save would add .npy to any other name
        np.save(tmp, np.arange(5))
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path / "cache"
    assert np.array_equal(np.load(tmp_path / "cache" / "images.npy"), np.arange(5))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["images.npy"]


def test_a_memmap_writer_fills_the_temp_path(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    with atomic_write(tmp_path / "images.npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=data.shape)
        mm[:] = data
        mm.flush()
        del mm
    assert np.array_equal(np.load(tmp_path / "images.npy", mmap_mode="r"), data)


def test_every_writer_gives_its_files_the_permissions_of_a_plain_write(tmp_path, umask):
    from PIL import Image

    import vitkit
    from vitkit.data.sources import load_source
    from vitkit.infer.export import export_pt2
    from vitkit.train.checkpoint import save_checkpoint

    from .conftest import tiny_kwargs

    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    written = [model.save(tmp_path / "model.safetensors"), save_checkpoint(tmp_path / "last.ckpt", {"step": 1})]
    written.append(export_pt2(model, tmp_path / "model.pt2", dynamic=False, check=False).path)
    for i in range(2):
        (tmp_path / "images" / f"c{i}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (i * 200, 0, 0)).save(tmp_path / "images" / f"c{i}" / "a.png")
    cache = load_source(str(tmp_path / "images"), cache_dir=tmp_path / "cache", progress=False).cache_path
    written += sorted(Path(cache).iterdir())
    assert [p.name for p in written[3:]] == ["images.npy", "labels.npy", "meta.json"]
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}
