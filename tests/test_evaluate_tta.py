"""Flip test-time augmentation in evaluate_batches: the logits of an image and its mirror are averaged."""

import math

import pytest
import torch
from torch import nn

from vitkit.infer.evaluate import evaluate_batches


class LeftRight(nn.Module):
    """Two logits: the mean of the left half and of the right half of the image. A mirror image swaps them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 2)
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], dim=1)


def test_flip_tta_averages_the_mirror_view():
    x = torch.zeros(4, 1, 2, 4)
    x[..., :2] = 3.0  # bright left halves: one view says class 0 with confidence
    y = torch.tensor([0, 0, 0, 0])
    plain = evaluate_batches(LeftRight(), [(x, y)], 2, precision="fp32")
    assert plain["top1"] == 1.0
    assert plain["loss"] == pytest.approx(math.log(1 + math.exp(-3.0)), abs=1e-6)
    # averaged with the mirror image both logits are 1.5: a tie, so the loss is log(2) for every image
    tta = evaluate_batches(LeftRight(), [(x, y)], 2, precision="fp32", tta=True)
    assert tta["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
