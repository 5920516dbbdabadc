"""Batched RandAugment / TrivialAugmentWide: each op equals torchvision's, and each image draws its own ops."""

import pytest
import torch
from torchvision.transforms import v2

from vitkit.data.autoaugment import (
    OPS,
    RAND_AUGMENT_SPACE,
    TRIVIAL_AUGMENT_SPACE,
    BatchRandAugment,
    BatchTrivialAugmentWide,
    apply_op,
)


def _images(c=3):
    x = torch.randint(0, 256, (6, c, 20, 24), dtype=torch.uint8)  # non-square, to catch h/w mix-ups
    x[:, :, :5] = 9  # a flat band: exercises ties in contrast / equalize / autocontrast
    return x


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", list(OPS))
def test_each_op_matches_torchvision_per_image(name, channels):
    ref = v2.TrivialAugmentWide()
    x = _images(channels)
    fn, signed = TRIVIAL_AUGMENT_SPACE[name]
    table = fn(31, 20, 24) if fn is not None else torch.zeros(1)
    picks = [table[i] for i in (0, 7, 19, 30) if i < len(table)]  # values exactly as torchvision draws them
    for value in picks:
        for sign in (1, -1) if signed else (1,):
            mag = float(value) * sign
            ours = apply_op(name, x, torch.full((len(x),), mag, dtype=torch.float64))
            theirs = torch.stack(
                [ref._apply_image_or_video_transform(img, name, mag, ref.interpolation, ref._fill) for img in x]
            )
            assert torch.equal(ours, theirs), (name, mag)


def test_per_image_magnitudes_in_one_call():
    x = _images()
    mags = torch.tensor([0.0, 0.3, -0.3, 0.6, -0.9, 0.9], dtype=torch.float64)
    for name in ("Rotate", "ShearX", "Brightness", "Contrast", "Sharpness"):
        batched = apply_op(name, x, mags)
        one_by_one = torch.cat([apply_op(name, x[i : i + 1], mags[i : i + 1]) for i in range(len(x))])
        assert torch.equal(batched, one_by_one), name


@pytest.mark.parametrize("policy", [BatchRandAugment(2, 9), BatchTrivialAugmentWide()])
def test_policies_draw_per_image_and_replay_from_rng(policy):
    img = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    x = img.expand(64, -1, -1, -1).contiguous()
    state = torch.get_rng_state()
    out = policy(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert len({o.numpy().tobytes() for o in out}) > 10  # identical inputs, many different outputs
    torch.set_rng_state(state)
    assert torch.equal(policy(x), out)


def test_spaces_are_torchvisions():
    # the op tables mirror torchvision's (names and order), so draws are uniform over the same ops
    assert list(RAND_AUGMENT_SPACE) == list(v2.RandAugment._AUGMENTATION_SPACE)
    assert list(TRIVIAL_AUGMENT_SPACE) == list(v2.TrivialAugmentWide._AUGMENTATION_SPACE)
    for ours, theirs in ((RAND_AUGMENT_SPACE, v2.RandAugment), (TRIVIAL_AUGMENT_SPACE, v2.TrivialAugmentWide)):
        for name, (fn, signed) in ours.items():
            tfn, tsigned = theirs._AUGMENTATION_SPACE[name]
            assert signed == tsigned
            if fn is not None:
                assert torch.equal(fn(31, 32, 40), tfn(31, 32, 40)), name


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_runs_where_the_images_are(name):
    """On a GPU the images live there and the magnitudes come from the CPU generator: on the "meta" device any
    tensor an op leaves on the CPU raises a device-mismatch error, which is how a GPU run would fail."""
    x = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device="meta")
    out = apply_op(name, x, torch.tensor([0.3, -0.3, 0.1, 0.0]) if name != "Posterize" else torch.tensor([4, 5, 6, 8]))
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.uint8
    policy = BatchTrivialAugmentWide()
    assert policy(x).device.type == "meta"
