"""A pretrained model for another number of input channels: grayscale, RGB + near-infrared, multispectral.

Only the first convolution sees the channels (the patch embedding, or the conv stem's first layer), so only it
changes, by the rule timm's `adapt_input_conv` uses:

- one channel: the RGB filters summed. A gray image g repeated to RGB gives sum_c W_c * g = (sum_c W_c) * g, so the
  1-channel model computes exactly what the RGB model computes on the gray image repeated (before normalisation).
- k channels: the source filters repeated cyclically (R, G, B, R, ...) and scaled by source / k, so an input whose
  channels all carry the same signal still gives activations of the pretrained magnitude.

The preprocessing follows: one channel gets the mean of the per-channel means and stds; k channels the stats
repeated cyclically like the filters.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from ..config import PreprocessConfig
from ..model import VisionTransformer
from ..model.serialization import apply_task

log = logging.getLogger(__name__)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Conv weight (O, C, kh, kw) -> (O, in_chans, kh, kw): summed for one channel, else repeated and rescaled.

    Raises:
        ValueError: for in_chans < 1 or a weight that is not a 4-D conv kernel.
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if weight.ndim != 4:
        raise ValueError(f"expected a conv weight (out, in, kh, kw), got shape {tuple(weight.shape)}")
    source = weight.shape[1]
    if in_chans == source:
        return weight
    w = weight.float()  # half-precision sums lose digits
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / source), 1, 1)[:, :in_chans] * (source / in_chans)
    return w.to(weight.dtype)


def adapt_channel_stats(stats: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel normalisation stats for in_chans channels: their mean for one, else repeated cyclically."""
    if in_chans == len(stats):
        return tuple(stats)
    if in_chans == 1:
        return (sum(stats) / len(stats),)
    return tuple(stats[i % len(stats)] for i in range(in_chans))


def first_conv_key(model: VisionTransformer) -> str:
    """The state-dict name of the one weight that reads the input channels."""
    return "patch_embed.stem.0.weight" if model.cfg.stem == "conv" else "patch_embed.proj.weight"


def adapt_in_chans(model: VisionTransformer, in_chans: int) -> VisionTransformer:
    """A copy of `model` that takes `in_chans` input channels (first conv and preprocessing adapted as above)."""
    source = model.cfg.in_chans
    if in_chans == source:
        return model
    state = model.state_dict()
    key = first_conv_key(model)
    state[key] = adapt_input_conv(state[key], in_chans)
    pre: PreprocessConfig = model.preprocess
    pre = dataclasses.replace(
        pre, mean=adapt_channel_stats(pre.mean, in_chans), std=adapt_channel_stats(pre.std, in_chans)
    )
    new = VisionTransformer(model.cfg.replace(in_chans=in_chans), preprocess=pre, labels=model.labels)
    apply_task(new, getattr(model, "task", None))  # a task's own head (a segmentation decoder) too
    new.load_state_dict(state)
    rule = "summed" if in_chans == 1 else f"repeated and scaled by {source}/{in_chans}"
    log.info("input channels %d -> %d: %s filters %s", source, in_chans, key, rule)
    return new.to(next(model.parameters()).device).train(model.training)


__all__ = ["adapt_input_conv", "adapt_channel_stats", "adapt_in_chans", "first_conv_key"]
