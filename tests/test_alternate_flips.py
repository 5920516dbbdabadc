"""Alternating flips (`augment.alternate_flips`, airbench's derandomised flip): image i is flipped in epoch e iff
coin(seed, i) XOR (e odd), a pure function of the run seed and the dataset index; the loader hands the transform
the indices and the epoch; where it cannot (streamed data), the option is refused rather than turned into random
flips; a resumed run with it on stays bit-identical."""

import argparse

import numpy as np
import pytest
import torch

from vitkit.config import PreprocessConfig
from vitkit.data.loader import BatchLoader
from vitkit.data.sources import ImageArrayDataset
from vitkit.data.transforms import AugmentConfig, alternating_flips, build_train_transform, index_coin
from vitkit.train import fit
from vitkit.train.checkpoint import load_checkpoint
from vitkit.train.options import add_training_arguments, overrides_from_args

from .conftest import make_image_folder
from .test_train_resume import tiny_run


def ramp_dataset(n: int) -> ImageArrayDataset:
    """n 4x4 gray images, each a left-to-right ramp (a flip reverses it); label = the image's own index."""
    images = np.broadcast_to(np.array([10, 60, 110, 160], dtype=np.uint8)[None, None, :, None], (n, 4, 4, 1)).copy()
    return ImageArrayDataset(images=images, labels=np.arange(n), classes=[str(i) for i in range(n)], source="ramps")


def flipped_per_epoch(n: int, epochs: int, seed: int = 0) -> np.ndarray:
    """(epochs, n) bool: whether each image came out flipped in each epoch of a shuffled, seeded BatchLoader."""
    pre = PreprocessConfig(input_size=(4, 4), mean=(0.5,), std=(0.25,), crop_pct=1.0)
    aug = AugmentConfig(random_crop_pad=0, hflip=True, alternate_flips=True)  # the random flip gives way
    tf = build_train_transform(aug, pre, n, in_chans=1, seed=seed)
    loader = BatchLoader(ramp_dataset(n), None, 16, shuffle=True, seed=seed, drop_last=False, transform=tf)
    seen = np.zeros((epochs, n), dtype=bool)
    for e in range(epochs):
        for x, y in loader:
            seen[e, y.numpy()] = (x[:, 0, 0, 0] > x[:, 0, 0, -1]).numpy()  # a decreasing ramp: flipped
    return seen


def test_over_two_epochs_each_image_is_flipped_exactly_once_and_half_in_each():
    before = torch.get_rng_state()
    seen = flipped_per_epoch(400, epochs=3)
    assert torch.equal(torch.get_rng_state(), before)  # no random draw: nothing for a resume to replay
    assert (seen[0] ^ seen[1]).all()  # each image flipped in exactly one of the two epochs
    assert np.array_equal(seen[2], seen[0])  # and the pattern repeats
    assert 170 <= seen[0].sum() <= 230  # a fair coin per image: about half (binomial sd 10)


def test_the_coin_is_a_pure_function_of_seed_and_index():
    idx = np.arange(1000)
    coin = index_coin(idx, seed=3)
    assert np.array_equal(index_coin(idx[::-1], seed=3), coin[::-1])  # per index, whatever the batch order
    assert np.array_equal(index_coin(torch.from_numpy(idx[5:9]), seed=3), coin[5:9])
    assert 450 <= coin.sum() <= 550
    other = index_coin(idx, seed=4)
    assert 400 <= (coin != other).sum() <= 600  # another seed, another coin
    assert torch.equal(alternating_flips(idx, 1, 3), torch.from_numpy(~coin))
    with pytest.raises(ValueError, match=">= 0"):
        index_coin(np.array([-1]), seed=0)


def test_without_the_option_the_transform_and_loader_are_unchanged():
    pre = PreprocessConfig(input_size=(4, 4), mean=(0.5,), std=(0.25,), crop_pct=1.0)
    tf = build_train_transform(AugmentConfig(random_crop_pad=0, hflip=True), pre, 8, in_chans=1)
    assert not tf.takes_indices
    x, y = torch.from_numpy(ramp_dataset(8).images).permute(0, 3, 1, 2), torch.arange(8)
    torch.manual_seed(1)
    a = tf(x, y)[0]
    torch.manual_seed(1)
    b = tf(x, y, indices=np.arange(8), epoch=1)[0]  # ignored: random flips draw as before
    assert torch.equal(a, b)


def test_bad_combinations_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hflip: false"):
        AugmentConfig(alternate_flips=True, hflip=False)
    pre = PreprocessConfig(input_size=(4, 4), mean=(0.5,), std=(0.25,), crop_pct=1.0)
    tf = build_train_transform(AugmentConfig(random_crop_pad=0, alternate_flips=True), pre, 8, in_chans=1)
    x = torch.from_numpy(ramp_dataset(8).images).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match="dataset index"):
        tf(x, torch.arange(8))  # a caller that has no indices gets an error, not random flips
    folder = make_image_folder(tmp_path / "images", per_class=8, size=8)
    cfg = tiny_run(tmp_path / "run", data=str(folder), stream=True, augment=dict(alternate_flips=True))
    with pytest.raises(ValueError, match="streamed data"):
        fit(cfg)


def test_the_flag_sets_the_option():
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    assert overrides_from_args(parser.parse_args(["--alternate-flips"]))["augment"]["alternate_flips"] is True


def test_resume_with_alternating_flips_is_bit_identical(tmp_path):
    augment = dict(random_crop_pad=1, alternate_flips=True, label_smoothing=0.1, random_erasing=0.25)
    straight = fit(tiny_run(tmp_path / "straight", augment=augment))
    half = fit(tiny_run(tmp_path / "resumed", augment=augment, stop_after_steps=37))  # mid-epoch 2
    assert not half.finished and half.steps == 37
    resumed = fit(tiny_run(tmp_path / "resumed", augment=augment))
    assert resumed.finished and resumed.steps == straight.steps
    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert straight.val_top1 == resumed.val_top1
