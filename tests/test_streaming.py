"""Streaming readers (vitkit/data/shards.py, streaming.py): shards read back exactly, ranks and decoder processes
share an epoch without overlap, a resume continues with the next unseen samples, bad samples are skipped and named."""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.config import PreprocessConfig
from vitkit.data.decode import ImageDecodeError, decode_image
from vitkit.data.listing import DataSourceError
from vitkit.data.sources import load_source
from vitkit.data.stream_sources import open_stream_source
from vitkit.data.streaming import RandomAccessLoader, ShardLoader, TrainCrop, batches_before, decode_tensor
from vitkit.data.transforms import AugmentConfig

from .conftest import png_bytes
from .streaming_data import SIDE, Whole, sample_ids, sample_image, write_wds_shards


def batches(loader, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The next `n` batches of `loader` (None: the rest of its epoch)."""
    return list(itertools.islice(iter(loader), n))


def epoch_ids(loader) -> list[int]:
    return [i for x, _ in batches(loader) for i in sample_ids(x)]


def test_webdataset_shards_read_back_every_image_and_label(tmp_path):
    pattern = write_wds_shards(tmp_path / "shards", shards=3, per_shard=5)
    src = open_stream_source(pattern, cache_dir=tmp_path / "cache", progress=False)
    assert len(src) == 15 and src.classes == ["0", "1", "2"] and src.sequential

    seen = {}
    for x, y in ShardLoader(src, None, 4, train=False, op=Whole(), workers=0):
        seen.update({i: (img, int(label)) for i, img, label in zip(sample_ids(x), x, y)})
    assert sorted(seen) == list(range(15))
    for i, (img, label) in seen.items():
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(sample_image(i))) and label == i % 3

    cached = load_source(pattern, cache_dir=tmp_path / "cache", progress=False)  # the decode cache reads the same
    assert cached.images.shape == (15, SIDE, SIDE, 3) and cached.classes == src.classes
    for img, label in zip(cached.images, cached.labels):
        i = int(img[0, 0, 0]) + 256 * int(img[0, 1, 0])
        assert np.array_equal(img, sample_image(i)) and label == i % 3


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_cover_every_sample_once_an_epoch(tmp_path, workers):
    src = open_stream_source(write_wds_shards(tmp_path / "s", 4, 6), cache_dir=tmp_path / "c", progress=False)
    per_epoch = []
    for epoch in range(2):
        ids = []
        for rank in (0, 1):
            # a buffer smaller than a shard: blocks, not whole shards, are shuffled
            loader = ShardLoader(
                src, None, 3, train=True, op=Whole(), rank=rank, world_size=2, workers=workers, buffer=4
            )
            assert len(loader) == 4  # 24 samples / (2 ranks x 3)
            loader.set_epoch(epoch)
            ids += epoch_ids(loader)
        assert sorted(ids) == list(range(24))  # every sample once, on one rank
        per_epoch.append(ids)
    assert per_epoch[0] != per_epoch[1]  # each epoch deals and shuffles anew


def test_the_dataloader_takes_batch_g_from_stream_g_mod_workers():
    """The rule a resume relies on to know how far each decoder process has read."""
    assert [batches_before(7, w, 3) for w in range(3)] == [3, 2, 2]  # batches 0, 3, 6 / 1, 4 / 2, 5
    assert [batches_before(0, w, 2) for w in range(2)] == [0, 0]
    assert batches_before(5, 0, 1) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_stream_resumes_with_the_next_unseen_samples(tmp_path, workers):
    src = open_stream_source(write_wds_shards(tmp_path / "s", 3, 7), cache_dir=tmp_path / "c", progress=False)

    def loader():
        return ShardLoader(src, None, 3, train=True, op=Whole(), seed=5, workers=workers, buffer=4)

    straight = loader()
    assert len(straight) == 7
    expected = [sample_ids(x) for _ in range(2) for x, _ in batches(straight)]
    assert sorted(sum(expected[:7], [])) == list(range(21))

    first = loader()
    seen = [sample_ids(x) for x, _ in batches(first)]  # epoch 0
    seen += [sample_ids(x) for x, _ in batches(first, 3)]  # 3 batches into epoch 1
    state = first.state_dict()
    assert (state["epoch"], state["batch_index"]) == (1, 3)
    resumed = loader()  # a fresh process would build this from the checkpoint
    resumed.load_state_dict(state)
    rest = [sample_ids(x) for x, _ in batches(resumed)]
    assert seen + rest == expected
    assert not set(sum(rest, [])) & set(sum(seen[7:], []))  # nothing of epoch 1 comes twice


def test_resumed_crops_are_the_same_pixels(tmp_path):
    """Each image's RandomResizedCrop is seeded by where it is read, not by what was read before it."""
    src = open_stream_source(write_wds_shards(tmp_path / "s", 2, 6), cache_dir=tmp_path / "c", progress=False)
    crop = TrainCrop(AugmentConfig(rrc_scale=(0.2, 1.0)), PreprocessConfig(input_size=(5, 5)))

    def loader():
        return ShardLoader(src, None, 2, train=True, op=crop, seed=1, workers=0, buffer=5)

    expected = [x for x, _ in batches(loader())]
    first = loader()
    batches(first, 4)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for a, (b, _) in zip(expected[4:], batches(resumed)):
        assert a.shape == (2, 3, 5, 5) and torch.equal(a, b)


def test_a_resume_refuses_shards_that_changed(tmp_path):
    pattern = write_wds_shards(tmp_path / "s", 2, 4)
    src = open_stream_source(pattern, cache_dir=tmp_path / "c", progress=False)
    state = ShardLoader(src, None, 2, train=True, op=Whole()).state_dict()
    write_wds_shards(tmp_path / "s", 2, 5)  # rewritten: other samples at the same positions
    changed = open_stream_source(pattern, cache_dir=tmp_path / "c", progress=False)
    assert len(changed) == 10  # the index was rebuilt, not read stale from the cache
    with pytest.raises(ValueError, match="shards changed"):
        ShardLoader(changed, None, 2, train=True, op=Whole()).load_state_dict(state)


def test_folder_stream_resumes_exactly_and_keeps_the_batch_loader_order(tmp_path):
    for i in range(20):
        folder = tmp_path / "imgs" / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample_image(i)).save(folder / f"{i:03d}.png")
    src = open_stream_source(str(tmp_path / "imgs"), progress=False)
    assert src.classes == ["even", "odd"] and not src.sequential

    def loader():
        return RandomAccessLoader(src, None, 4, op=Whole(), workers=2, seed=3)

    straight = loader()
    names = [src.read(int(i))[0] for i in straight.epoch_order()]
    expected = [sample_ids(x) for x, _ in batches(straight)]
    assert [int(n.split("/")[-1][:3]) for n in names] == sum(expected, [])  # BatchLoader's permutation
    first = loader()
    seen = [sample_ids(x) for x, _ in batches(first, 2)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert seen + [sample_ids(x) for x, _ in batches(resumed)] == expected


def _write_members(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_truncated_shards_and_bad_samples_are_skipped_and_named(tmp_path):
    folder = tmp_path / "s"
    write_wds_shards(folder, 2, 4)  # ids 0..7
    shard1 = folder / "train-000001.tar"
    with tarfile.open(shard1) as tf:
        cut = next(m for m in tf if m.name == "000006.png").offset_data + 10
    shard1.write_bytes(shard1.read_bytes()[:cut])  # sample 6 cut short: the shard ends after samples 4 and 5
    good = [(f"{i:06d}.png", png_bytes(sample_image(i))) for i in (8, 9)]
    _write_members(
        folder / "train-000002.tar",
        [good[0], ("000008.cls", b"2")]
        + [("bad.jpg", b"<!DOCTYPE html><html>404</html>"), ("bad.cls", b"0")]
        + [("nolabel.png", good[1][1]), ("noimage.cls", b"1"), ("badlabel.png", good[1][1]), ("badlabel.json", b"{")]
        + [good[1], ("000009.cls", b"0")],
    )
    pattern = str(folder / "train-{000000..000002}.tar")
    src = open_stream_source(pattern, cache_dir=tmp_path / "c", progress=False)
    structural = dict(src.skipped)
    assert "truncated" in structural["train-000001.tar"]
    assert "no label" in structural["train-000002.tar:nolabel"]
    assert "no image" in structural["train-000002.tar:noimage"]
    assert "unreadable json label" in structural["train-000002.tar:badlabel"]
    assert len(src) == 9  # 4 + 2 + (8, bad, 9): the undecodable one is found only when decoded

    loader = ShardLoader(src, None, 4, train=False, op=Whole(), workers=0)
    assert sorted(epoch_ids(loader)) == [0, 1, 2, 3, 4, 5, 8, 9]
    assert [n for n, _ in loader.skipped] == ["train-000002.tar:bad"] and "HTML" in loader.skipped[0][1]

    cached = load_source(pattern, cache_dir=tmp_path / "c", progress=False)
    assert len(cached) == 8
    assert {"train-000001.tar", "train-000002.tar:nolabel"} <= {n for n, _ in cached.skipped}
    assert any("bad.jpg" in n for n, _ in cached.skipped)


def test_shard_patterns_that_name_missing_files_are_refused(tmp_path):
    write_wds_shards(tmp_path / "s", 2, 2)
    with pytest.raises(DataSourceError, match="1 of 3 shard"):
        open_stream_source(str(tmp_path / "s" / "train-{000000..000002}.tar"), progress=False)
    with pytest.raises(DataSourceError, match="matches no file"):
        open_stream_source(str(tmp_path / "s" / "val-*.tar"), progress=False)


def test_more_ranks_than_shards_is_refused(tmp_path):
    src = open_stream_source(write_wds_shards(tmp_path / "s", 2, 3), cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(DataSourceError, match="2 shard.*3 ranks"):
        ShardLoader(src, None, 2, train=True, op=Whole(), rank=0, world_size=3)


def test_decode_tensor_reads_jpegs_as_pil_does_and_names_what_it_cannot_read():
    y, x = np.mgrid[0:30, 0:40]
    buf = io.BytesIO()
    Image.fromarray(np.stack([x * 6, y * 8, x + y], -1).astype(np.uint8)).save(buf, "JPEG", quality=95)
    img = decode_tensor(buf.getvalue(), "a.jpg")
    assert img.shape == (3, 30, 40) and img.dtype == torch.uint8
    pil = torch.from_numpy(decode_image(buf.getvalue())).permute(2, 0, 1)
    assert (img.int() - pil.int()).abs().float().mean() < 1.0  # libjpeg both; upsampling may differ by a level

    with pytest.raises(ImageDecodeError, match="truncated|damaged"):
        decode_tensor(buf.getvalue()[:60], "cut.jpg")
