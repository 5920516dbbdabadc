"""Streaming end to end: `vitkit shard` and Hugging Face datasets read back what was written, `vitkit train` streams
shards (forced, or above the cache limit, said in one line), and a streamed run resumes bit-identically."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import main
from vitkit.data.listing import DataSourceError
from vitkit.data.sources import load_source
from vitkit.data.stream_sources import cache_limit, open_stream_source, parse_size
from vitkit.data.streaming import RandomAccessLoader, ShardLoader
from vitkit.train import TrainConfig, fit
from vitkit.train.checkpoint import load_checkpoint

from .conftest import make_image_folder
from .streaming_data import Whole, sample_ids, sample_image, write_wds_shards


def pixels_and_classes(loader, classes) -> list[tuple[str, str]]:
    """(hash of the pixels, class name) of every image a loader gives: the same images and labels in any order."""
    out = []
    for x, y in loader:
        out += [(hashlib.sha1(img.numpy().tobytes()).hexdigest(), classes[int(c)]) for img, c in zip(x, y)]
    return sorted(out)


def folder_images(root) -> list[tuple[str, str]]:
    return sorted(
        (hashlib.sha1(np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).tobytes()).hexdigest(), p.parent.name)
        for p in root.rglob("*.png")
    )


def test_vitkit_shard_writes_the_images_and_labels_the_reader_reads_back(tmp_path, capsys):
    make_image_folder(tmp_path / "imgs", per_class=8, size=8)
    assert main(["shard", str(tmp_path / "imgs"), str(tmp_path / "out"), "--max-size", "25kB", "--no-progress"]) == 0
    shards = sorted((tmp_path / "out").glob("train-*.tar"))
    assert len(shards) > 1 and all(p.stat().st_size <= 25_000 for p in shards)
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"classes": ["blue", "green", "red"]}
    pattern = capsys.readouterr().out.split("--data '")[1].split("'")[0]

    src = open_stream_source(pattern, cache_dir=tmp_path / "cache", progress=False)
    assert src.classes == ["blue", "green", "red"] and len(src) == 24
    assert list(src.labels) != sorted(src.labels)  # written in a shuffled order, not class by class
    loader = ShardLoader(src, None, 5, train=False, op=Whole(), workers=0)
    assert pixels_and_classes(loader, src.classes) == folder_images(tmp_path / "imgs")

    again = ["shard", str(tmp_path / "imgs"), str(tmp_path / "out"), "--no-progress"]
    assert main(again) == 1 and "already holds train-" in capsys.readouterr().err  # never mixes two runs' shards


def test_vitkit_shard_maps_a_second_source_onto_the_classes_already_there(tmp_path):
    make_image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=2, size=8)
    make_image_folder(tmp_path / "val", classes=("b", "c"), per_class=2, size=8, seed=1)
    assert main(["shard", str(tmp_path / "train"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert main(["shard", str(tmp_path / "val"), str(tmp_path / "out"), "--prefix", "val", "--no-progress"]) == 0
    val = open_stream_source(str(tmp_path / "out" / "val-000000.tar"), cache_dir=tmp_path / "c", progress=False)
    assert val.classes == ["a", "b", "c"] and sorted(set(val.labels.tolist())) == [1, 2]


@pytest.fixture
def hf_folder(tmp_path):
    """A `datasets` folder made here: 12 PNG images of 3 classes (ClassLabel), written with save_to_disk."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    rows = {"image": [Image.fromarray(sample_image(i)) for i in range(12)], "label": [i % 3 for i in range(12)]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "hf_dict"))
    ds.to_parquet(str(tmp_path / "part.parquet"))
    return tmp_path


def test_a_datasets_folder_streams_and_caches_the_same_images(hf_folder):
    src = open_stream_source(str(hf_folder / "hf"), cache_dir=hf_folder / "c", progress=False)
    assert src.classes == ["x", "y", "z"] and len(src) == 12 and not src.sequential
    loader = RandomAccessLoader(src, None, 5, op=Whole(), workers=0, shuffle=False, drop_last=False)
    got = {i: int(y) for x, ys in loader for i, y in zip(sample_ids(x), ys)}
    assert got == {i: i % 3 for i in range(12)}

    cached = load_source(str(hf_folder / "hf"), cache_dir=hf_folder / "c", progress=False)
    assert cached.images.shape == (12, 8, 8, 3) and cached.classes == ["x", "y", "z"]
    assert all(np.array_equal(cached.images[i], sample_image(i)) for i in range(12))

    test = open_stream_source(f"{hf_folder / 'hf_dict'}:test", cache_dir=hf_folder / "c", progress=False)
    assert len(test) == 4
    with pytest.raises(DataSourceError, match="splits.*'train'.*not 'valid'"):
        open_stream_source(f"{hf_folder / 'hf_dict'}:valid", cache_dir=hf_folder / "c", progress=False)
    parquet = open_stream_source(str(hf_folder / "part.parquet"), cache_dir=hf_folder / "c", progress=False)
    assert parquet.classes == ["x", "y", "z"] and len(parquet) == 12


def test_a_hub_dataset_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(DataSourceError, match="nobody/nothing.*only the datasets cache is read.*save_to_disk"):
        open_stream_source("hf:nobody/nothing", cache_dir=tmp_path / "c", progress=False)


def test_sizes_and_the_cache_limit(monkeypatch):
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size(4096) == 4096 and parse_size("1.5kB") == 1500
    for bad in ("", "ten", "5 parsecs", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    monkeypatch.setenv("VITKIT_CACHE_LIMIT", "3MB")
    assert cache_limit() == 3 * 10**6
    monkeypatch.setenv("VITKIT_CACHE_LIMIT", "lots")
    with pytest.raises(ValueError, match="VITKIT_CACHE_LIMIT"):
        cache_limit()


def test_vitkit_train_streams_shards_over_the_cache_limit(tmp_path, capsys, monkeypatch):
    pattern = write_wds_shards(tmp_path / "shards", 2, 12)
    common = ["train", "--data", pattern, "--epochs", "1", "--img-size", "8", "--model", "vit_digits_patch2_8"]
    common += ["--no-progress", "--threads", "1", "--workers", "1", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "small")]) == 0
    assert "streaming them" not in capsys.readouterr().out  # 24 tiny images: the decode cache is the faster path

    monkeypatch.setenv("VITKIT_CACHE_LIMIT", "1kB")
    assert main([*common, "--rrc", "--out", str(tmp_path / "big")]) == 0
    out = capsys.readouterr().out
    assert "would decode to about 4.6 kB, over the decode cache's limit of 1.0 kB" in out
    assert "streamed, cropped to 8x8" in out and (tmp_path / "big" / "model.safetensors").is_file()
    position = load_checkpoint(tmp_path / "big" / "last.ckpt")["rng"]["ranks"][0]["loader"]
    assert position["stream"] and position["index"]  # the shard stream's position travels in last.ckpt


def streamed_run(out, pattern, **kw) -> TrainConfig:
    augment = dict(hflip=True, auto_augment="randaugment", random_erasing=0.25, mixup_alpha=0.2)
    base = dict(
        data=pattern, stream=True, workers=0, val_split=0.25, out=str(out), image_size=8, model="vit_digits_patch2_8",
        model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, drop_path_rate=0.1), epochs=2, batch_size=4,
        warmup_epochs=0.5, progress=False, threads=1, augment=augment, cache_dir=str(out.parent / "cache"),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_a_streamed_run_resumes_bit_identically(tmp_path):
    pattern = write_wds_shards(tmp_path / "shards", 3, 8)
    straight = fit(streamed_run(tmp_path / "straight", pattern))
    assert straight.finished and straight.steps == 2 * (18 // 4)  # 18 training samples, 4 a batch
    half = fit(streamed_run(tmp_path / "resumed", pattern, stop_after_steps=6))  # stops mid-epoch 2
    assert not half.finished
    resumed = fit(streamed_run(tmp_path / "resumed", pattern, workers=1))  # a decoder process now: the same order
    assert resumed.finished and resumed.steps == straight.steps
    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.val_top1 == resumed.val_top1

    with pytest.raises(ValueError, match="stream: run has True, now False"):
        fit(streamed_run(tmp_path / "resumed", pattern, stream=False, cache=True))


def _two_rank_worker(rank: int, port: int, tmp: str, pattern: str) -> None:
    import os
    from pathlib import Path

    from vitkit.train import distributed as D

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    try:
        fit(streamed_run(Path(tmp) / "straight", pattern, val_split=0.0))
        fit(streamed_run(Path(tmp) / "resumed", pattern, val_split=0.0, stop_after_steps=3))
        fit(streamed_run(Path(tmp) / "resumed", pattern, val_split=0.0))
    finally:
        D.teardown(D.DistEnv(rank=rank, world_size=2))


def test_a_streamed_run_under_two_ranks_resumes_bit_identically(tmp_path):
    """Each rank streams its own shards, both take the same steps (DDP), and each resumes at its own position."""
    import torch.multiprocessing as mp

    from .conftest import free_port

    pattern = write_wds_shards(tmp_path / "shards", 4, 8)
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path), pattern), nprocs=2, join=True)
    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert a["step"] == b["step"] == 2 * (32 // 8)  # 2 epochs of 32 images, 4 a rank, 2 ranks
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for r in range(2):
        assert b["rng"]["ranks"][r]["loader"]["stream"]
        assert torch.equal(a["rng"]["ranks"][r]["torch_rng"], b["rng"]["ranks"][r]["torch_rng"])
