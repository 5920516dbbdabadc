"""Batched train/eval transforms: shapes, dtypes, ranges, per-sample randomness, soft targets, RNG replay."""

import pytest
import torch

from vitkit.config import PreprocessConfig
from vitkit.data.transforms import (
    AugmentConfig,
    augment_for_size,
    build_eval_transform,
    build_train_transform,
    loss_label_smoothing,
    random_crop_with_padding,
    random_erasing,
    random_hflip,
    random_resized_crop,
    soft_target_cross_entropy,
)

PRE = PreprocessConfig(input_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)


def _batch(b=16, c=3, h=32, w=32):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8), torch.arange(b) % 10


@pytest.mark.parametrize(
    "aug",
    [
        AugmentConfig(),
        AugmentConfig(random_resized_crop=True, rrc_scale=(0.35, 1.0)),
        AugmentConfig(auto_augment="randaugment"),
        AugmentConfig(auto_augment="trivialaugment"),
        AugmentConfig(auto_augment="autoaugment"),
        AugmentConfig(random_erasing=1.0),
    ],
    ids=["crop-flip", "rrc", "randaugment", "trivialaugment", "autoaugment", "erasing"],
)
def test_train_transform_shapes_dtypes_ranges(aug):
    x, y = _batch()
    out, target = build_train_transform(aug, PRE, num_classes=10, in_chans=3)(x, y)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6  # mean/std 0.5: [0, 255] -> [-1, 1]
    assert target.dtype == torch.int64 and torch.equal(target, y)  # hard labels without mixing


def test_resize_to_input_size_and_channel_handling():
    x, y = _batch(c=1, h=8, w=8)
    pre = PreprocessConfig(input_size=(16, 16), crop_pct=1.0)
    out, _ = build_train_transform(AugmentConfig(), pre, 10, in_chans=3)(x, y)
    assert out.shape == (16, 3, 16, 16)  # grayscale repeated for an RGB model, resized to the input size
    out, _ = build_train_transform(AugmentConfig(random_resized_crop=True), pre, 10, in_chans=1)(x, y)
    assert out.shape == (16, 1, 16, 16)
    rgb, _ = _batch()
    ev = build_eval_transform(PreprocessConfig(input_size=(24, 24), crop_pct=0.875), in_chans=1)(rgb)
    assert ev.shape == (16, 1, 24, 24) and ev.dtype == torch.float32


def test_eval_transform_is_deterministic_normalisation():
    x, _ = _batch()
    out = build_eval_transform(PRE, 3)(x)
    torch.testing.assert_close(out, x.float() / 127.5 - 1.0)


def test_crop_and_flip_are_per_sample():
    # identical images in, different crops/flips out: the random draw is per image, not per batch
    img = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 3, 32, 32)
    x = img.expand(64, -1, -1, -1).contiguous()
    crops = random_crop_with_padding(x, 4)
    assert crops.shape == x.shape and len({c.numpy().tobytes() for c in crops}) > 10
    flips = random_hflip(x)
    flipped = torch.tensor([torch.equal(f, img[0].flip(-1)) for f in flips])
    assert 5 < int(flipped.sum()) < 59 and all(torch.equal(f, img[0]) for f in flips[~flipped])
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))[0]
    for c in crops[:8]:
        assert any(torch.equal(c, padded[:, t : t + 32, left : left + 32]) for t in range(9) for left in range(9))
    rrc = random_resized_crop(x, (32, 32), scale=(0.2, 0.5))
    assert len({c.numpy().tobytes() for c in rrc}) == 64


def test_random_erasing_per_sample_rectangles():
    x = torch.ones(32, 3, 16, 16)
    out = random_erasing(x, p=0.5)
    erased = (out == 0).flatten(1).any(1)
    assert 3 < int(erased.sum()) < 29  # about half the images, chosen independently
    areas = (out[erased] == 0)[:, 0].flatten(1).sum(1)
    assert len(set(areas.tolist())) > 1 and (areas <= 0.34 * 256 + 16).all()


def test_mixup_cutmix_soft_targets_sum_to_one_with_smoothing():
    x, y = _batch(b=32)
    for kw in (dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0), dict(mixup_alpha=0.8, cutmix_alpha=1.0)):
        aug = AugmentConfig(label_smoothing=0.1, **kw)
        out, t = build_train_transform(aug, PRE, 10, 3)(x, y)
        assert out.shape == (32, 3, 32, 32) and t.shape == (32, 10) and t.dtype == torch.float32
        torch.testing.assert_close(t.sum(1), torch.ones(32))
        assert t.min() >= 0.01 - 1e-6  # smoothing 0.1 / 10 classes is already in the soft targets
        assert loss_label_smoothing(aug) == 0.0  # ... so the loss must not smooth again
        loss = soft_target_cross_entropy(torch.zeros(32, 10), t)
        torch.testing.assert_close(loss, torch.log(torch.tensor(10.0)))
    assert loss_label_smoothing(AugmentConfig(label_smoothing=0.1)) == 0.1
    # mix_prob=0: never mixed, but still (smoothed) soft targets so every batch has the same type
    out, t = build_train_transform(AugmentConfig(mixup_alpha=1.0, mix_prob=0.0), PRE, 10, 3)(x, y)
    torch.testing.assert_close(t, torch.nn.functional.one_hot(y, 10).float())


def test_transforms_replay_from_torch_rng_state():
    aug = AugmentConfig(
        auto_augment="randaugment", random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1
    )
    tf = build_train_transform(aug, PRE, 10, 3)
    x, y = _batch()
    state = torch.get_rng_state()
    a = tf(x, y)
    torch.set_rng_state(state)
    b = tf(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "size, pad, flip",
    [((8, 8), 0, False), ((16, 16), 2, False), ((28, 28), 4, False), ((32, 32), 4, True), ((224, 160), 20, True)],
)
def test_crop_pad_and_flip_scale_with_the_input_size(size, pad, flip):
    aug = augment_for_size(AugmentConfig(), size)
    assert (aug.random_crop_pad, aug.hflip) == (pad, flip)
    given = augment_for_size(AugmentConfig(random_crop_pad=3, hflip=True), size)
    assert (given.random_crop_pad, given.hflip) == (3, True)  # a recipe's or a flag's values win at any size


def test_default_train_transform_leaves_tiny_glyphs_in_place():
    """On 8-px digits the default recipe neither shifts nor mirrors: the transform is plain normalisation."""
    x, y = _batch(c=1, h=8, w=8)
    pre = PreprocessConfig(input_size=(8, 8), mean=(0.5,), std=(0.5,), crop_pct=1.0)
    out, _ = build_train_transform(AugmentConfig(), pre, 10, in_chans=1)(x, y)
    torch.testing.assert_close(out, x.float() / 127.5 - 1.0)
    x, y = _batch()
    moved, _ = build_train_transform(AugmentConfig(), PRE, 10, in_chans=3)(x, y)
    assert not torch.equal(moved, x.float() / 127.5 - 1.0)  # at 32 px the same defaults shift and flip


def test_unknown_auto_augment_is_an_error():
    with pytest.raises(ValueError, match="auto_augment"):
        AugmentConfig(auto_augment="fancy")
    assert AugmentConfig(auto_augment="TrivialAugmentWide").auto_augment == "trivialaugment"


@pytest.mark.parametrize(
    "aug",
    [
        AugmentConfig(),
        AugmentConfig(random_erasing=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
        AugmentConfig(random_resized_crop=True, auto_augment="randaugment", aa_num_ops=3),
        AugmentConfig(random_crop_pad=4, auto_augment="trivialaugment", mixup_alpha=0.8, cutmix_alpha=1.0),
    ],
    ids=["crop_flip", "erase_mix", "rrc_randaugment", "trivialaugment_mix"],
)
def test_augmenting_on_a_device_draws_the_same_and_keeps_every_tensor_there(aug):
    """The trainer augments on its CUDA device. Same seed, same draws as on the CPU; and on the "meta" device any
    tensor left on the CPU by a transform raises a device-mismatch error, which is how a GPU run would fail."""
    from vitkit.config import PreprocessConfig
    from vitkit.data.transforms import EvalTransform, TrainTransform

    pre = PreprocessConfig(input_size=(32, 32), crop_pct=1.0)
    x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8)
    torch.manual_seed(0)
    host = TrainTransform(aug, pre, 10)(x, y)
    torch.manual_seed(0)
    dev = TrainTransform(aug, pre, 10, device="cpu")(x, y)
    assert torch.equal(host[0], dev[0]) and torch.equal(host[1], dev[1])
    out, _ = TrainTransform(aug, pre, 10, device="meta")(x, y)
    assert out.device.type == "meta" and out.shape == (8, 3, 32, 32)
    assert EvalTransform(pre, device="meta")(x).device.type == "meta"
