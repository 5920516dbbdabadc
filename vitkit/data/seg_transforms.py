"""Segmentation transforms: an image and its mask moved together, on whole batches of uint8 tensors.

Training: a random scale (log-uniform in `scale`) and a random crop at the model's input size, then a horizontal
flip, drawn per sample and applied to image and mask through one shared sampling grid (`affine_grid`): the image
is sampled bilinearly, the mask by nearest neighbour, so every output pixel keeps the label of the pixel it shows.
Where a zoomed-out crop reaches past the image, the image is black and the mask says "ignore" (255).

torchvision's v2 transforms move a `tv_tensors.Mask` with its image too, but draw one set of parameters per call:
a batch takes a Python loop over its images, which on a GPU (where the trainer runs augmentation) is a few small
kernel launches per image; the grid does the whole batch in two `grid_sample` calls wherever the batch lives. On the
CPU either costs little next to a training step.

Evaluation: the whole image resized to the input size (no center crop: every pixel of the mask is scored), the
mask left at its own resolution; the metrics upsample the logits to it (`vitkit.tasks.segment`).

All draws come from torch's global CPU generator, as in transforms.py, so a resumed run draws the same crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..config import PreprocessConfig
from .preprocess import interpolation_mode, normalize, to_device
from .segmentation import IGNORE_INDEX

DEFAULT_SCALE = (0.5, 2.0)  # zoom range of the random scale, as in the usual ADE20K / Cityscapes recipes


def joint_grid(
    batch: int, size: tuple[int, int], scale: tuple[float, float], hflip: bool, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One sampling grid (B, h, w, 2) per sample: zoom by s (log-uniform in `scale`), a random crop, maybe a flip.

    At s = 1 the whole input fills the output; s > 1 shows a random 1/s part of it, s < 1 places the whole input at
    a random position inside a larger (padded) window.
    """
    lo, hi = math.log(scale[0]), math.log(scale[1])
    s = torch.exp(torch.empty(batch).uniform_(lo, hi))  # (B,) zoom factors
    half = 1.0 / s  # half-width of the crop window in normalised input coordinates
    reach = (1.0 - half).abs()  # how far the window's centre may move and still stay on (or around) the image
    cx = (torch.rand(batch) * 2 - 1) * reach
    cy = (torch.rand(batch) * 2 - 1) * reach
    flip = torch.where(torch.rand(batch) < 0.5, -1.0, 1.0) if hflip else torch.ones(batch)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = half * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = half
    theta[:, 1, 2] = cy
    return F.affine_grid(to_device(theta, device), [batch, 1, *size], align_corners=False)


def sample_image(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W) sampled bilinearly at `grid`: uint8 (B, C, h, w), black outside the image."""
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def sample_mask(mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Masks (B, H, W) sampled by nearest neighbour at `grid`: int64 (B, h, w), IGNORE_INDEX outside the image.

    The labels are shifted up by one before sampling, so the zero that grid_sample gives outside the image is told
    apart from class 0 and becomes the ignore value.
    """
    shifted = (mask.to(torch.float32) + 1)[:, None]  # (B, 1, H, W): 1..256, exact in float32
    out = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].long()
    return torch.where(out == 0, IGNORE_INDEX, out - 1)


def random_scale_crop_flip(
    x: torch.Tensor,
    mask: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] = DEFAULT_SCALE,
    hflip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, C, H, W) and masks (B, H, W) -> the same random views of both: (B, C, h, w), (B, h, w)."""
    grid = joint_grid(x.shape[0], size, scale, hflip, x.device)
    return sample_image(x, grid), sample_mask(to_device(mask, x.device), grid)


def _match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 and in_chans == 3 else x


def resize_whole(x: torch.Tensor, pre: PreprocessConfig) -> torch.Tensor:
    """uint8 (..., C, H, W) -> (..., C, h, w) at the input size, the whole picture (aspect ratio not kept)."""
    if tuple(x.shape[-2:]) == tuple(pre.input_size):
        return x
    return TF.resize(x, list(pre.input_size), interpolation=interpolation_mode(pre.interpolation), antialias=True)


class SegTrainTransform:
    """(uint8 images (B, C, H, W), masks (B, H, W)) -> (float32 (B, C, h, w) normalised, int64 masks (B, h, w))."""

    takes_targets = True

    def __init__(
        self,
        pre: PreprocessConfig,
        in_chans: int = 3,
        scale: tuple[float, float] = DEFAULT_SCALE,
        hflip: bool = True,
        device: torch.device | str | None = None,
    ):
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be 0 < low <= high, got {scale}")
        self.pre, self.in_chans, self.scale, self.hflip, self.device = pre, in_chans, tuple(scale), hflip, device
        self.size = tuple(pre.input_size)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device is not None:
            x, mask = to_device(x, self.device), to_device(mask, self.device)
        x, mask = random_scale_crop_flip(_match_channels(x, self.in_chans), mask, self.size, self.scale, self.hflip)
        return normalize(x, self.pre, self.in_chans), mask


class SegEvalTransform:
    """(uint8 images (B, C, H, W), masks (B, H, W)) -> (float32 (B, C, h, w), int64 masks at their own size)."""

    takes_targets = True

    def __init__(self, pre: PreprocessConfig, in_chans: int = 3, device: torch.device | str | None = None):
        self.pre, self.in_chans, self.device = pre, in_chans, device

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device is not None:
            x, mask = to_device(x, self.device), to_device(mask, self.device)
        x = resize_whole(_match_channels(x, self.in_chans), self.pre)
        return normalize(x, self.pre, self.in_chans), mask.long()


__all__ = [
    "SegTrainTransform",
    "SegEvalTransform",
    "random_scale_crop_flip",
    "joint_grid",
    "sample_image",
    "sample_mask",
    "resize_whole",
    "DEFAULT_SCALE",
]
