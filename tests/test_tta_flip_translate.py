"""Flip + translate test-time augmentation (`tta="flip-translate"`): the mirror pair weighted 0.5 and the mirror pairs
of the image shifted one pixel up-left and down-right (reflected border) 0.25 each; `True` / "flip" keep their
meaning, a misspelt mode and a segmentation map are refused."""

import argparse
import math

import pytest
import torch
from torch import nn

from vitkit.infer.evaluate import TTA_MODES, evaluate_batches, translated, tta_logits, tta_mode


class MeanPool(nn.Module):
    """Logits from the per-channel mean of the image: the same for any rearrangement of its pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean((2, 3)))


class Flatten(nn.Module):
    """Logits from every pixel by its place: neither flip- nor translation-invariant."""

    def __init__(self, pixels: int, classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(pixels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def period_two_images(n: int = 3, size: int = 6) -> torch.Tensor:
    """Images tiled from a random 2x2 patch per channel: a one-pixel reflected shift or a mirror (even size)
    rearranges their pixels and changes none."""
    tile = torch.randn(n, 3, 2, 2)
    return tile.repeat(1, 1, size // 2, size // 2)


def test_an_invariant_model_gives_the_same_logits_with_every_tta():
    model, x = MeanPool().eval(), period_two_images()
    with torch.no_grad():
        plain = tta_logits(model, x, False)
        for mode in (True, *TTA_MODES):
            torch.testing.assert_close(tta_logits(model, x, mode), plain)


def test_flip_translate_is_the_weighted_mean_of_the_six_views_by_hand():
    model = Flatten(9).eval()
    a = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1 2 3] [4 5 6] [7 8 9]]
    x = torch.cat([a, a.square()])  # two images, neither symmetric
    # padded by one with reflection and cropped: content moved down-right, and up-left (the rows and columns
    # written out from the 5x5 reflected image)
    down_right = torch.tensor([[5.0, 4, 5], [2, 1, 2], [5, 4, 5]])
    up_left = torch.tensor([[5.0, 6, 5], [8, 9, 8], [5, 6, 5]])
    torch.testing.assert_close(translated(a, 1, 1)[0, 0], down_right)
    torch.testing.assert_close(translated(a, -1, -1)[0, 0], up_left)
    views_of_a = [v.view(1, 1, 3, 3) for v in (a, down_right, up_left)]
    views_of_b = [v.square() for v in views_of_a]  # squaring moves no pixel: the second image's views
    with torch.no_grad():

        def pair(v: torch.Tensor) -> torch.Tensor:
            return (model(v) + model(v.flip(-1))) / 2

        want = torch.cat(
            [0.5 * pair(views[0]) + 0.25 * pair(views[1]) + 0.25 * pair(views[2]) for views in (views_of_a, views_of_b)]
        )
        flip = torch.cat([pair(a), pair(a.square())])
        torch.testing.assert_close(tta_logits(model, x, "flip-translate"), want)
        torch.testing.assert_close(tta_logits(model, x, "flip"), flip)
        torch.testing.assert_close(tta_logits(model, x, True), flip)
        assert not torch.allclose(want, flip)  # the shifted views do move this model's logits


def test_evaluate_batches_scores_the_flip_translate_logits():
    model, x, y = Flatten(3 * 4 * 4, 3).eval(), torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        logits = tta_logits(model, x, "flip-translate")
    want = nn.functional.cross_entropy(logits, y).item()
    got = evaluate_batches(model, [(x, y)], 3, precision="fp32", tta="flip-translate")
    assert got["loss"] == pytest.approx(want, rel=1e-6) and math.isfinite(got["loss"])


def test_a_misspelt_mode_is_refused_before_any_forward_pass():
    class Never(nn.Module):
        def forward(self, x):
            raise AssertionError("ran a forward pass")

    with pytest.raises(ValueError, match="flip-translate"):
        evaluate_batches(Never(), [(torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long))], 2, tta="translate")
    assert tta_mode(None) is None and tta_mode(True) == "flip" and tta_mode("flip-translate") == "flip-translate"


def test_flip_translate_refuses_segmentation_maps():
    class PerPixel(nn.Module):
        def forward(self, x):
            return x[:, :2]  # (B, 2, H, W): a two-class map

    with pytest.raises(ValueError, match="use tta 'flip'"):
        tta_logits(PerPixel(), torch.randn(2, 3, 4, 4), "flip-translate")
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(tta_logits(PerPixel(), x, "flip"), x[:, :2])  # a mirrored map is mirrored back


def test_evaluate_cli_tta_flag():
    from vitkit.commands.evaluate import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["ckpt", "--data", "d"]).tta is None
    assert p.parse_args(["ckpt", "--data", "d", "--tta"]).tta == "flip"
    assert p.parse_args(["ckpt", "--data", "d", "--tta", "flip-translate"]).tta == "flip-translate"
    assert next(a for a in p._actions if a.dest == "tta").choices == TTA_MODES
