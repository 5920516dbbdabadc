"""Training and evaluation transforms on whole batches of uint8 tensors.

Train, in order (timm's order): RandomResizedCrop *or* resize + pad-and-random-crop → horizontal flip →
RandAugment / TrivialAugmentWide / AutoAugment → float + normalise → RandomErasing → MixUp / CutMix.
Geometric ops, flips, erasing and mixing are vectorised over the batch with a separate random draw per sample.
With `alternate_flips` (airbench's derandomised flip) the flip is no draw at all: each image is flipped in every
other epoch, from a seeded coin per image (`alternating_flips`), so over two epochs it is seen once each way.

Label smoothing: when MixUp or CutMix is on, the transform returns soft targets (B, K) that already include
label smoothing, so the loss must be a plain soft-target cross-entropy (`soft_target_cross_entropy`). Without
mixing it returns hard int64 labels and the loss applies `label_smoothing` itself
(`loss_label_smoothing(aug)` tells the loss which value to use).

All randomness comes from torch's global CPU generator, so `torch.get_rng_state()` saved in a checkpoint makes
a resumed run draw the very same augmentations. With `device=` (the trainer passes its CUDA device) the uint8 batch
moves to that device first and the pixel work runs there; only the per-sample draws (a few numbers per image) stay
on the CPU, so a GPU run draws the same augmentations as a CPU run with the same seed. Every CPU tensor crosses
with `to_device` (pinned, queued): a plain `.to("cuda")` of pageable memory would stall the host once per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import PreprocessConfig
from .autoaugment import BatchRandAugment, BatchTrivialAugmentWide
from .preprocess import interpolation_mode, normalize, resize_and_crop, to_device

AUTO_AUGMENTS = ("randaugment", "trivialaugment", "autoaugment")


@dataclass
class AugmentConfig:
    """The augmentation side of a training recipe.

    `random_crop_pad` and `hflip` left at None scale with the model's input size (see `augment_for_size`): the CIFAR
    classic (pad 4 + flip) at 32 px, no shift and no flip on 8-px digits. A recipe or flag that sets them wins.
    """

    random_crop_pad: int | None = None  # zero-pad by this many px, crop back at a random offset (0: off; None: by size)
    hflip: bool | None = None  # horizontal flip with probability 0.5 (None: by input size)
    # instead of random flips: image i is flipped in epoch e iff coin(seed, i) XOR (e odd) (`alternating_flips`)
    alternate_flips: bool = False
    random_resized_crop: bool = False  # replaces pad+crop: crop a random area/aspect, resize to the input size
    rrc_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of the crop
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the crop
    auto_augment: str | None = None  # "randaugment" | "trivialaugment" | "autoaugment" | None
    aa_num_ops: int = 2  # RandAugment: ops per image
    aa_magnitude: int = 9  # RandAugment: magnitude bin (of aa_magnitude_bins)
    aa_magnitude_bins: int = 31
    random_erasing: float = 0.0  # probability of erasing one random rectangle per image
    mixup_alpha: float = 0.0  # MixUp Beta(alpha, alpha); 0: off
    cutmix_alpha: float = 0.0  # CutMix Beta(alpha, alpha); 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # with both on: probability of CutMix rather than MixUp
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.auto_augment is not None:
            name = self.auto_augment.lower().replace("_", "").replace("-", "")
            name = {"trivialaugmentwide": "trivialaugment", "ra": "randaugment", "ta": "trivialaugment"}.get(name, name)
            if name in ("none", ""):
                name = None
            elif name not in AUTO_AUGMENTS:
                raise ValueError(f"auto_augment {self.auto_augment!r} is not one of {AUTO_AUGMENTS} or None")
            self.auto_augment = name
        self.rrc_scale = tuple(float(v) for v in self.rrc_scale)
        self.rrc_ratio = tuple(float(v) for v in self.rrc_ratio)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.alternate_flips and self.hflip is False:
            raise ValueError("alternate_flips flips every image in every other epoch; hflip: false asks for no flips")

    @property
    def mixes(self) -> bool:
        """True when targets come out soft (B, K) because MixUp or CutMix is on."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


# Below this side (px) an image is taken for a glyph that fills its frame (scikit-learn's 8-px digits; MNIST-like
# 28-px scans): mirroring it makes another symbol or none, so flips default to off. Natural-image data starts at
# CIFAR's 32 px, where flips are timm's and torchvision's usual default.
MIN_FLIP_SIDE = 32
# Below this side even a one-pixel shift crops strokes off such a glyph: on the 8-px digits a 1-px pad costs
# held-out accuracy both in `vitkit train --data digits --epochs 20` and in the demo's 100 epochs (`vitkit demo`).
MIN_PAD_SIDE = 16


def default_crop_pad(size: tuple[int, int]) -> int:
    """The pad-and-crop shift for an input of `size` (h, w): an eighth of the shorter side, rounded half up.

    An eighth is CIFAR's classic 4 px at 32 px; it gives 2 at 16, 4 at 28 and 28 at 224. Images under
    `MIN_PAD_SIDE` get no shift at all.
    """
    side = min(size)
    return 0 if side < MIN_PAD_SIDE else int(side / 8 + 0.5)


def default_hflip(size: tuple[int, int]) -> bool:
    """Whether to flip an input of `size` (h, w) left-right by default: from `MIN_FLIP_SIDE` px on the shorter side.

    Data that must not be mirrored at any size (text, digits, street numbers) wants `--no-flip` (`hflip: false`).
    """
    return min(size) >= MIN_FLIP_SIDE


def augment_for_size(aug: AugmentConfig, size: tuple[int, int]) -> AugmentConfig:
    """`aug` with its size-dependent defaults (`random_crop_pad`, `hflip` left at None) filled in for `size`."""
    pad = default_crop_pad(size) if aug.random_crop_pad is None else aug.random_crop_pad
    flip = default_hflip(size) if aug.hflip is None else aug.hflip
    if aug.alternate_flips:  # these flips replace the random ones, whatever the size
        flip = aug.hflip
    return replace(aug, random_crop_pad=pad, hflip=flip)


def loss_label_smoothing(aug: AugmentConfig) -> float:
    """The label smoothing the loss must apply: none when the transform already smoothed soft targets."""
    return 0.0 if aug.mixes else aug.label_smoothing


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for (B, K) probability targets (from MixUp / CutMix), averaged over the batch."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# --------------------------------------------------------------------------------------- per-sample geometry


def _randint_below(high: torch.Tensor) -> torch.Tensor:
    """Per-element uniform integers in [0, high) for an integer tensor `high` >= 1."""
    return (torch.rand(high.shape) * high).long().clamp_(max=high - 1)


def random_crop_with_padding(x: torch.Tensor, pad: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero-pad (B, C, H, W) by `pad` and crop each image at its own random offset back to `size` (default H, W)."""
    b, c, h, w = x.shape
    oh, ow = size or (h, w)
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    top = _randint_below(torch.full((b,), padded.shape[2] - oh + 1))
    left = _randint_below(torch.full((b,), padded.shape[3] - ow + 1))
    dev = x.device  # offsets drawn on the CPU generator (resume-exact), the gather runs where the images are
    rows = to_device((top[:, None] + torch.arange(oh))[:, :, None], dev)  # (B, oh, 1)
    cols = to_device((left[:, None] + torch.arange(ow))[:, None, :], dev)  # (B, 1, ow)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, oh, ow, C): one gather, per-sample offsets
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Flip each image of (B, C, H, W) left-right with probability p, independently."""
    return hflip_where(x, torch.rand(x.shape[0]) < p)


def hflip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the images of (B, C, H, W) left-right where the CPU bool mask `flip` (B,) is set."""
    flip = to_device(flip, x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


_MASKS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection of uint64 whose every output bit depends on
    every input bit, so consecutive inputs give independent-looking outputs."""
    z = (z ^ (z >> np.uint64(30))) * _MASKS[0]
    z = (z ^ (z >> np.uint64(27))) * _MASKS[1]
    return z ^ (z >> np.uint64(31))


def index_coin(indices: np.ndarray | torch.Tensor, seed: int) -> np.ndarray:
    """A fair coin per dataset index (bool, shape of `indices`), a pure function of (seed, index): no random state
    is read or advanced, so it is the same in every epoch, after a resume and on every rank."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError(f"dataset indices must be >= 0, got {int(idx.min())}")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        key = _mix64(np.array([seed % 2**64], dtype=np.uint64))
        return (_mix64(idx.astype(np.uint64) + key) >> np.uint64(63)).astype(bool)


def alternating_flips(indices: np.ndarray | torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Which images to flip (bool (B,)) in `epoch`, by dataset index: coin(seed, index) XOR (epoch odd) (airbench's
    derandomised flip). Each image is flipped in exactly one of any two consecutive epochs, half of them in each."""
    return torch.from_numpy(index_coin(indices, seed) ^ bool(epoch % 2))


def _sample_boxes(
    b: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], tries: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's box sampler for b images at once: (top, left, height, width, found) each (B,).

    As in torchvision: up to `tries` draws of an area fraction and a log-uniform aspect ratio; the first draw
    that fits is kept; images with none get the whole image.
    """
    area = h * w * torch.empty(b, tries).uniform_(scale[0], scale[1])
    log_r = torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).round().long()
    ch = torch.sqrt(area / r).round().long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.float().argmax(dim=1)  # index of the first fitting try (0 when none fits)
    found = ok.any(dim=1)
    sel = torch.arange(b)
    ch, cw = ch[sel, first], cw[sel, first]
    ch = torch.where(found, ch, torch.full_like(ch, h))
    cw = torch.where(found, cw, torch.full_like(cw, w))
    top = _randint_below(h - ch + 1)
    left = _randint_below(w - cw + 1)
    return top, left, ch, cw, found


def random_resized_crop(
    x: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """RandomResizedCrop with its own box per image, done as one bilinear `grid_sample` over the batch.

    (B, C, H, W) uint8 -> (B, C, size) uint8. Unlike torchvision's per-image resize it does not antialias when a
    crop is shrunk; at the small crops this is meant for (CIFAR-size images) crops are mostly enlarged.
    """
    b, c, h, w = x.shape
    top, left, ch, cw, _ = _sample_boxes(b, h, w, scale, ratio)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cw / w  # normalised half-width of the crop
    theta[:, 0, 2] = (2 * left + cw) / w - 1  # normalised crop centre
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(to_device(theta, x.device), [b, c, *size], align_corners=False)  # (B, h', w', 2)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_erasing(
    x: torch.Tensor,
    p: float,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> torch.Tensor:
    """RandomErasing per image (torchvision's sampler): with probability p, one rectangle set to `value`."""
    b, c, h, w = x.shape
    apply = torch.rand(b) < p
    tries = 10
    area = h * w * torch.empty(b, tries).uniform_(scale[0], scale[1])
    r = torch.exp(torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    eh = torch.sqrt(area * r).round().long()
    ew = torch.sqrt(area / r).round().long()
    ok = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = ok.float().argmax(dim=1)
    sel = torch.arange(b)
    eh, ew = eh[sel, first], ew[sel, first]
    apply &= ok.any(dim=1)
    eh, ew = torch.where(apply, eh, 1), torch.where(apply, ew, 1)
    top = _randint_below(h - eh + 1)
    left = _randint_below(w - ew + 1)
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None])[:, None]  # (B, 1, H, W)
    return x.masked_fill(to_device(mask, x.device), value)


# ---------------------------------------------------------------------------------------------------- mixing


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int64 -> (B, K) float32: 1 - s + s/K on the label, s/K elsewhere (CrossEntropyLoss's convention)."""
    off = smoothing / num_classes
    t = torch.full((y.shape[0], num_classes), off, dtype=torch.float32)
    return t.scatter_(1, y[:, None], 1.0 - smoothing + off)


def mixup_cutmix(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, aug: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of a float batch with itself rolled by one; returns (x, soft targets (B, K) summing to 1).

    One lambda per batch, as in timm's default 'batch' mode; CutMix's lambda is corrected to the box's true area.
    """
    # multi-hot targets (B, K) (multi-label data) mix as they are: a mixed image holds a share of both label sets
    hot = y.float() if y.ndim == 2 else smooth_one_hot(y, num_classes, aug.label_smoothing)
    targets = to_device(hot, x.device)
    if not aug.mixes or torch.rand(()).item() >= aug.mix_prob:
        return x, targets
    use_cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha <= 0 or torch.rand(()).item() < aug.mix_switch_prob)
    alpha = aug.cutmix_alpha if use_cutmix else aug.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = x.roll(1, dims=0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        bh, bw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * partner
    return x, lam * targets + (1.0 - lam) * targets.roll(1, dims=0)


# ------------------------------------------------------------------------------------------------ transforms


def _match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Grayscale data for an RGB model: repeat the channel (RGB for a 1-channel model is handled by normalize)."""
    if x.shape[1] == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    return x


def _auto_augment_module(aug: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """uint8 (B, C, H, W) -> uint8, every image with its own draw. RandAugment / TrivialAugmentWide run batched
    (vitkit.data.autoaugment); AutoAugment's sub-policies run through torchvision one image at a time."""
    if aug.auto_augment == "randaugment":
        return BatchRandAugment(aug.aa_num_ops, aug.aa_magnitude, aug.aa_magnitude_bins)
    if aug.auto_augment == "trivialaugment":
        return BatchTrivialAugmentWide(aug.aa_magnitude_bins)
    if aug.auto_augment == "autoaugment":
        per_image = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
        return lambda x: torch.stack([per_image(img) for img in x])
    return None


class TrainTransform:
    """(uint8 (B, C, H, W), int64 (B,)) -> (float32 (B, C, h, w), int64 (B,) or soft targets (B, K)).

    With `aug.alternate_flips` it also needs each image's dataset index and the epoch (`takes_indices`: the loader
    passes `indices=` and `epoch=`), and `seed` seeds the per-image coin.
    """

    takes_targets = True

    def __init__(
        self,
        aug: AugmentConfig,
        pre: PreprocessConfig,
        num_classes: int,
        in_chans: int = 3,
        device: torch.device | str | None = None,
        seed: int = 0,
    ):
        self.seed = seed
        self.pre = pre
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.size = tuple(pre.input_size)
        self.aug = augment_for_size(aug, self.size)  # the crop and flip run at the model's input size
        self.auto_augment = _auto_augment_module(aug)
        self.device = device  # where the pixel work runs (None: where the batch is, the CPU)

    @property
    def takes_indices(self) -> bool:
        """Whether the loader must pass each image's dataset index and the epoch (alternating flips)."""
        return self.aug.alternate_flips

    def geometry(self, x: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
        """Crop (random resized, or resize + pad-and-crop) and flip: uint8 in, uint8 (B, C, h, w) out. `flips`
        (bool (B,)): which images to flip, in place of the random flip."""
        if self.aug.random_resized_crop:
            x = random_resized_crop(x, self.size, self.aug.rrc_scale, self.aug.rrc_ratio)
        else:
            if tuple(x.shape[-2:]) != self.size:
                x = TF.resize(x, list(self.size), interpolation=interpolation_mode(self.pre.interpolation))
            if self.aug.random_crop_pad > 0:
                x = random_crop_with_padding(x, self.aug.random_crop_pad)
        if flips is not None:
            x = hflip_where(x, flips)
        elif self.aug.hflip:
            x = random_hflip(x)
        return x

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, indices: np.ndarray | None = None, epoch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flips = None
        if self.aug.alternate_flips:
            if indices is None or epoch is None:
                raise ValueError(
                    "alternate_flips flips each image by its dataset index and the epoch, and this caller passed "
                    "neither (indices=, epoch=): use a loader that does (BatchLoader), or random flips"
                )
            if len(indices) != x.shape[0]:
                raise ValueError(f"{len(indices)} indices for a batch of {x.shape[0]} images")
            flips = alternating_flips(indices, epoch, self.seed)
        if self.device is not None:  # uint8 moves: 4x less to copy than float32
            x = to_device(x, self.device)
        x = self.geometry(_match_channels(x, self.in_chans), flips)
        if self.auto_augment is not None:  # each image draws its own ops and magnitudes (on the CPU generator)
            x = self.auto_augment(x)
        x = normalize(x, self.pre, self.in_chans)  # float32 (B, C, h, w)
        if self.aug.random_erasing > 0:
            x = random_erasing(x, self.aug.random_erasing)
        if self.aug.mixes:
            return mixup_cutmix(x, y, self.num_classes, self.aug)
        return x, y


class EvalTransform:
    """uint8 (B, C, H, W) -> float32 (B, C, h, w): resize by 1/crop_pct, center-crop, normalise (as inference)."""

    takes_targets = False

    def __init__(self, pre: PreprocessConfig, in_chans: int = 3, device: torch.device | str | None = None):
        self.pre = pre
        self.in_chans = in_chans
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.device is not None:
            x = to_device(x, self.device)
        x = _match_channels(x, self.in_chans)
        if not (tuple(x.shape[-2:]) == tuple(self.pre.input_size) and self.pre.crop_pct == 1.0):
            x = resize_and_crop(x, self.pre)
        return normalize(x, self.pre, self.in_chans)


def build_train_transform(
    aug: AugmentConfig,
    pre: PreprocessConfig,
    num_classes: int,
    in_chans: int = 3,
    device: torch.device | str | None = None,
    seed: int = 0,
):
    """The training transform for a batch: see TrainTransform; soft targets iff `aug.mixes`; `seed` seeds the
    alternating flips' per-image coin."""
    return TrainTransform(aug, pre, num_classes, in_chans, device, seed)


def build_eval_transform(pre: PreprocessConfig, in_chans: int = 3, device: torch.device | str | None = None):
    """The evaluation transform for a batch: see EvalTransform."""
    return EvalTransform(pre, in_chans, device)
