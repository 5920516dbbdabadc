"""Segmentation data: the three source forms, the pairs left out (and why), the cache; joint augmentation."""

import csv
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.config import PreprocessConfig
from vitkit.data.seg_transforms import (
    SegEvalTransform,
    SegTrainTransform,
    joint_grid,
    random_scale_crop_flip,
    sample_image,
    sample_mask,
)
from vitkit.data.segmentation import IGNORE_INDEX, decode_mask, load_segmentation_source, random_split
from vitkit.data.sources import DataSourceError

from .conftest import PALETTE
from .segmentation_data import SHAPE_CLASSES, read_mask, write_segmentation_folder


def _load(spec, tmp_path, **kw):
    return load_segmentation_source(str(spec), cache_dir=tmp_path / "cache", progress=False, **kw)


# ------------------------------------------------------------------------------------------------ sources


def test_folder_reads_images_masks_and_classes(tmp_path):
    root = write_segmentation_folder(tmp_path / "seg", n=6, size=16)
    ds = _load(root, tmp_path)
    assert ds.classes == list(SHAPE_CLASSES)
    assert ds.images.shape == (6, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.masks.shape == (6, 16, 16) and ds.masks.dtype == np.uint8
    assert ds.names == [f"images/{i:03d}.png" for i in range(6)]
    for i in range(6):
        assert np.array_equal(ds.masks[i], read_mask(root / "masks" / f"{i:03d}.png"))
        assert np.array_equal(ds.images[i], np.asarray(Image.open(root / "images" / f"{i:03d}.png")))
    assert ds.skipped == []
    again = _load(root, tmp_path)  # the second load reads the cache, with the same arrays
    assert again.from_cache and np.array_equal(again.masks, ds.masks) and np.array_equal(again.images, ds.images)


def test_palette_mask_gives_indices_not_colours(tmp_path):
    m = np.array([[0, 1], [2, 255]], np.uint8)
    img = Image.fromarray(m, mode="P")
    img.putpalette([200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * (3 * 252) + [255, 255, 255])
    img.save(tmp_path / "p.png")
    assert np.array_equal(decode_mask(tmp_path / "p.png", "p.png"), m)
    Image.fromarray(np.stack([m * 50] * 3, -1).astype(np.uint8)).save(tmp_path / "gray_rgb.png")
    assert np.array_equal(decode_mask(tmp_path / "gray_rgb.png", "g"), m * 50)  # R = G = B: taken as indices


def test_tar_and_csv_give_the_folders_arrays(tmp_path):
    root = write_segmentation_folder(tmp_path / "seg", n=5, size=16)
    want = _load(root, tmp_path)
    tar_path = tmp_path / "seg.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(root, arcname="export/seg")
    from_tar = _load(tar_path, tmp_path)
    assert from_tar.classes == want.classes and len(from_tar) == 5
    assert np.array_equal(from_tar.images, want.images) and np.array_equal(from_tar.masks, want.masks)

    with open(root / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask"])
        for i in range(5):
            w.writerow([f"images/{i:03d}.png", f"masks/{i:03d}.png"])
    from_csv = _load(root / "list.csv", tmp_path)
    assert from_csv.classes == want.classes  # classes.txt beside the CSV
    assert np.array_equal(from_csv.images, want.images) and np.array_equal(from_csv.masks, want.masks)


def test_bad_pairs_are_skipped_and_named(tmp_path):
    root = write_segmentation_folder(tmp_path / "seg", n=6, size=16)
    (root / "masks" / "000.png").unlink()  # image without a mask
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(root / "masks" / "001.png")  # wrong size
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "masks" / "002.png")  # label 7 of 3 classes
    Image.fromarray((np.zeros((16, 16, 3)) + [255, 0, 0]).astype(np.uint8)).save(root / "masks" / "003.png")  # colours
    (root / "images" / "004.png").write_bytes(b"not a png")  # broken image
    ds = _load(root, tmp_path)
    assert len(ds) == 1 and ds.names == ["images/005.png"]
    reasons = dict(ds.skipped)
    assert "has no mask" in reasons["images/000.png"]
    assert "masks/001.png" in reasons["images/001.png"] and "16x8" in reasons["images/001.png"]
    assert "[7]" in reasons["images/002.png"] and "outside the 3 classes" in reasons["images/002.png"]
    assert "colour" in reasons["images/003.png"]
    assert "images/004.png" in reasons["images/004.png"]


def test_no_usable_pair_and_wrong_layouts_are_errors(tmp_path):
    root = write_segmentation_folder(tmp_path / "seg", n=2, size=16)
    for p in (root / "masks").iterdir():
        p.unlink()
    with pytest.raises(DataSourceError, match="none of the 2 images has a usable mask"):
        _load(root, tmp_path)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataSourceError, match="no images/ folder"):
        _load(tmp_path / "flat", tmp_path)
    with pytest.raises(DataSourceError, match="does not exist"):
        _load(tmp_path / "nowhere", tmp_path)


def test_validation_classes_checked_against_training(tmp_path):
    root = write_segmentation_folder(tmp_path / "seg", n=3, size=16, classes_txt=False)
    ds = _load(root, tmp_path, classes=["bg", "a", "b", "c"])  # unnamed classes: only their count matters
    assert ds.classes == ["bg", "a", "b", "c"]
    with pytest.raises(DataSourceError, match="outside the 2 expected classes"):
        _load(root, tmp_path, classes=["bg", "a"])
    named = write_segmentation_folder(tmp_path / "named", n=3, size=16)
    with pytest.raises(DataSourceError, match="do not match"):
        _load(named, tmp_path, classes=["sky", "road", "car"])


def test_pairs_of_other_sizes_are_resized_together(tmp_path):
    root = write_segmentation_folder(tmp_path / "seg", n=3, size=16)
    big = np.zeros((32, 32, 3), np.uint8)
    big[:, 16:] = PALETTE[0]
    big_mask = np.zeros((32, 32), np.uint8)
    big_mask[:, 16:] = 1
    Image.fromarray(big).save(root / "images" / "zz.png")
    Image.fromarray(big_mask).save(root / "masks" / "zz.png")
    ds = _load(root, tmp_path)
    i = ds.names.index("images/zz.png")
    assert ds.masks[i].shape == (16, 16)
    assert set(np.unique(ds.masks[i]).tolist()) == {0, 1}  # nearest: no label in between
    assert (ds.masks[i][:, :8] == 0).all() and (ds.masks[i][:, 8:] == 1).all()


def test_random_split_is_seeded_and_disjoint():
    tr, va = random_split(10, 0.2, seed=3)
    assert len(va) == 2 and sorted(set(tr) | set(va)) == list(range(10)) and not set(tr) & set(va)
    assert np.array_equal(random_split(10, 0.2, seed=3)[1], va)


# ------------------------------------------------------------------------------------------ augmentation


def _coded_batch(b=6, size=24, seed=0):
    """Images whose every pixel tells its class: 4x4 blocks of a PALETTE colour, mask = that colour's index."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 4, (b, size // 4, size // 4), generator=g)
    mask = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8)  # (B, H, W)
    colours = torch.tensor(PALETTE[:4], dtype=torch.uint8)  # (4, 3)
    image = colours[mask.long()].permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    return image, mask


def _class_of_pixels(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) -> (B, h, w): the PALETTE index nearest to each pixel's colour."""
    colours = torch.tensor(PALETTE[:4], dtype=torch.float32)  # (4, 3)
    d = ((image.permute(0, 2, 3, 1).float()[..., None, :] - colours) ** 2).sum(-1)  # (B, h, w, 4)
    return d.argmin(-1)


def test_joint_augmentation_keeps_image_and_mask_aligned():
    image, mask = _coded_batch()
    out_img, out_mask = random_scale_crop_flip(image, mask, (20, 20), scale=(0.5, 2.0), hflip=True)
    assert out_img.shape == (6, 3, 20, 20) and out_img.dtype == torch.uint8
    assert out_mask.shape == (6, 20, 20) and out_mask.dtype == torch.int64
    labelled = out_mask != IGNORE_INDEX
    agree = (_class_of_pixels(out_img) == out_mask)[labelled].float().mean().item()
    assert agree > 0.9  # only pixels on block borders, blended by the bilinear image sampling, may differ
    outside = out_img.permute(0, 2, 3, 1)[~labelled].int().sum(-1)  # (pixels,) ignored: outside the image
    assert (outside == 0).float().mean() > 0.75  # black, but for a rim the bilinear image sampling blends in
    assert (~labelled).any()  # some zoomed-out view did reach past the image
    mirrored = (_class_of_pixels(out_img.flip(-1)) == out_mask)[labelled].float().mean().item()
    assert mirrored < 0.7  # the check above would catch a mask that moved differently from its image


def test_unit_scale_without_flip_is_the_identity_and_flip_mirrors_both():
    image, mask = _coded_batch()
    same_img, same_mask = random_scale_crop_flip(image, mask, (24, 24), scale=(1.0, 1.0), hflip=False)
    assert torch.equal(same_img, image) and torch.equal(same_mask, mask.long())
    grid = joint_grid(6, (24, 24), (1.0, 1.0), hflip=True)
    f_img, f_mask = sample_image(image, grid), sample_mask(mask, grid)
    for i in range(6):
        flipped = torch.equal(f_mask[i], mask[i].long().flip(-1))
        assert flipped or torch.equal(f_mask[i], mask[i].long())
        assert torch.equal(f_img[i], image[i].flip(-1) if flipped else image[i])


def test_train_and_eval_transforms_shapes_and_types():
    pre = PreprocessConfig(input_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)
    image, mask = _coded_batch(b=3, size=24)
    x, y = SegTrainTransform(pre)(image, mask)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (3, 16, 16)
    x, y = SegEvalTransform(pre)(image, mask)
    assert x.shape == (3, 3, 16, 16) and torch.equal(y, mask.long())  # masks scored at their own size
    gray = SegTrainTransform(pre, in_chans=3)(image[:, :1], mask)[0]  # one-channel data for an RGB model
    assert gray.shape == (3, 3, 16, 16)


# --------------------------------------------------------------------------------- the benchmark's canvases


def _heads_benchmark():
    """benchmarks/heads.py as a module (it imports its sibling `machine`, so its folder goes on sys.path)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("heads_under_test", bench / "heads.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(bench))


def test_benchmark_canvases_label_exactly_the_pasted_photos(tmp_path):
    heads = _heads_benchmark()
    colours = np.array([[10 + 40 * i, 255, 3] for i in range(6)], np.uint8)  # one flat colour per photo
    photos = np.broadcast_to(colours[:, None, None, :], (6, 32, 32, 3)).copy()
    labels = np.array([0, 1, 2, 3, 4, 5])
    n = heads.write_canvases(tmp_path / "c", photos, labels, [f"class{i}" for i in range(10)], seed=0)
    ds = _load(tmp_path / "c", tmp_path)
    assert len(ds) == n and 3 <= n <= 6 and ds.classes[0] == "background" and len(ds.classes) == 11
    assert ds.images.shape[1:] == (heads.CANVAS, heads.CANVAS, 3)
    for label in np.unique(ds.masks[ds.masks > 0]):
        assert (ds.images[ds.masks == label] == colours[label - 1]).all()  # the mask is where that photo shows
    assert 0.02 < (ds.masks > 0).mean() < 0.6


def test_benchmark_archive_split_is_stratified_disjoint_and_shuffled():
    heads = _heads_benchmark()
    labels = np.repeat(np.arange(10), 50)  # stored class by class, as an ImageFolder archive is
    classifier, pasted = heads.archive_split(labels, seed=0)
    assert len(pasted) == 100 and not set(classifier) & set(pasted)
    assert np.bincount(labels[pasted], minlength=10).tolist() == [10] * 10
    assert len(set(labels[pasted[:20]])) >= 5  # a prefix already mixes the classes
