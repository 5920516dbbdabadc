"""RandAugment and TrivialAugmentWide for a whole uint8 batch at once, each image with its own ops and magnitudes.

torchvision's `v2.RandAugment` draws one op per call, so a batch costs a Python loop over images (~2,000 img/s
at 32 px on one core, `benchmarks/data_pipeline.py`). Here every image still draws its own op, sign and
magnitude, but images that drew the same op are transformed together with per-image magnitudes: geometric ops as
one `grid_sample` with a (B, 2, 3) matrix stack, colour ops as broadcast arithmetic. The op table, magnitude
ranges and pixel arithmetic follow torchvision's (`_AUGMENTATION_SPACE`, `_apply_image_or_video_transform`, the
`functional` kernels), so an image transformed here equals torchvision's result for the same op and magnitude
(tests check it).

The draws (ops, bins, signs) come from torch's CPU generator wherever the images are; on a GPU the per-image
numbers cross with `to_device` and the pixel work runs there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .preprocess import to_device

# name -> (magnitudes(num_bins, height, width) or None, signed). Same order and values as torchvision.
MagnitudeTable = dict[str, tuple[Callable[[int, int, int], torch.Tensor] | None, bool]]

RAND_AUGMENT_SPACE: MagnitudeTable = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 30.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Posterize": (lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 4))).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}

TRIVIAL_AUGMENT_SPACE: MagnitudeTable = {
    "Identity": (None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 135.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Posterize": (lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / 6))).round().int(), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}


# ------------------------------------------------------------------------------------------ geometric ops


def _affine(
    x: torch.Tensor,
    angle: torch.Tensor,
    translate: tuple[torch.Tensor, torch.Tensor],
    shear: tuple[torch.Tensor, torch.Tensor],
    center: tuple[float, float],
) -> torch.Tensor:
    """torchvision's `affine_image` (nearest, zero fill) with per-image angle / translation / shear in degrees.

    `center` is in pixels relative to the image centre (torchvision's `center_f`). uint8 (B, C, H, W) in and out.
    """
    b, _, h, w = x.shape
    rot, sx, sy = torch.deg2rad(angle.double()), torch.deg2rad(shear[0].double()), torch.deg2rad(shear[1].double())
    cx, cy = center
    tx, ty = translate[0].double(), translate[1].double()
    # Rotation-shear matrix [[a, b], [c, d]] and its inverse (det 1), as in _get_inverse_affine_matrix.
    a = torch.cos(rot - sy) / torch.cos(sy)
    bb = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -bb, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    theta = torch.stack([m0, m1, m2, m3, m4, m5], dim=1).float().view(b, 2, 3)  # (B, 2, 3) output -> input pixels
    # Pixel-centre grid relative to the image centre, mapped by theta and normalised to [-1, 1] (as _affine_grid).
    base = torch.empty(1, h, w, 3, device=x.device)
    base[..., 0] = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device)
    base[..., 1] = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).unsqueeze(-1)
    base[..., 2] = 1.0
    scaled = to_device(theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h]), x.device)  # (B, 3, 2)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


def _zeros(m: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(m)


def _shear_x(x, m):
    corner = (-x.shape[-1] * 0.5, -x.shape[-2] * 0.5)  # torchvision shears about the top-left corner
    return _affine(x, _zeros(m), (_zeros(m), _zeros(m)), (torch.rad2deg(torch.atan(m)), _zeros(m)), corner)


def _shear_y(x, m):
    corner = (-x.shape[-1] * 0.5, -x.shape[-2] * 0.5)
    return _affine(x, _zeros(m), (_zeros(m), _zeros(m)), (_zeros(m), torch.rad2deg(torch.atan(m))), corner)


def _translate_x(x, m):
    return _affine(x, _zeros(m), (m.trunc(), _zeros(m)), (_zeros(m), _zeros(m)), (0.0, 0.0))


def _translate_y(x, m):
    return _affine(x, _zeros(m), (_zeros(m), m.trunc()), (_zeros(m), _zeros(m)), (0.0, 0.0))


def _rotate(x, m):
    return _affine(x, -m, (_zeros(m), _zeros(m)), (_zeros(m), _zeros(m)), (0.0, 0.0))  # rotate() negates


# ---------------------------------------------------------------------------------------------- colour ops


def _per_image(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-image numbers (B,) drawn on the CPU -> (B, 1, 1, 1) float32 where the images `like` are."""
    return to_device(m.float().view(-1, 1, 1, 1), like.device)


def _factor(m: torch.Tensor) -> torch.Tensor:
    """1 + magnitude, worked out in float64 like torchvision's Python floats, then used in float32."""
    return 1.0 + m.double()


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * x + (1 - ratio) * other, clamped and truncated to uint8 (torchvision's _blend)."""
    out = x.float() * _per_image(ratio, x)
    out.addcmul_(other, _per_image(1.0 - ratio, x))
    return out.clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 1, H, W) float luma, floored as torchvision does for integer images."""
    r, g, b = x.float().unbind(dim=1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1).floor_()


def _brightness(x, m):
    return (x.float() * _per_image(_factor(m), x)).clamp_(0, 255).to(torch.uint8)


def _color(x, m):
    if x.shape[1] == 1:  # saturation of a grayscale image: unchanged (as PIL and torchvision)
        return x
    return _blend(x, _gray(x), _factor(m))


def _contrast(x, m):
    gray = _gray(x) if x.shape[1] == 3 else x.float()
    return _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), _factor(m))


def _sharpness(x, m):
    b, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    k = to_device(torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0, x.device)
    out = x.float()
    blurred = F.conv2d(out, k.expand(c, 1, 3, 3), groups=c).round_()  # (B, C, H-2, W-2); borders stay
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(blurred - inner, _per_image(1.0 - _factor(m), x))
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(x, m):
    bits = m.long().clamp(0, 8)
    mask = ((1 << bits) - 1) << (8 - bits)  # keep the top `bits` bits
    return x & to_device(mask.to(torch.uint8).view(-1, 1, 1, 1), x.device)


def _solarize(x, m):
    return torch.where(x.float() >= _per_image(255.0 * m, x), 255 - x, x)


OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Identity": lambda x, m: x,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": lambda x, m: TF.autocontrast(x),  # per image and channel already
    "Equalize": lambda x, m: TF.equalize(x),
}


def apply_op(name: str, x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply op `name` to uint8 (B, C, H, W) with a per-image signed magnitude (B,) (torchvision's units)."""
    return OPS[name](x, magnitude.double())


# ------------------------------------------------------------------------------------------------ policies


class _BatchedAugment:
    space: MagnitudeTable

    def __init__(self, num_magnitude_bins: int = 31):
        self.num_bins = num_magnitude_bins
        self.names = list(self.space)

    def _magnitudes(self, name: str, bins: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Signed magnitudes (n,) for images that drew op `name` at magnitude bins `bins` (n,)."""
        fn, signed = self.space[name]
        if fn is None:
            return torch.zeros(len(bins))
        mags = fn(self.num_bins, h, w).float()[bins]
        if signed:  # each image flips its sign with probability 1/2
            mags = torch.where(torch.rand(len(bins)) <= 0.5, -mags, mags)
        return mags

    def _apply_round(self, x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """One op per image: draw ops, then run each drawn op once on the images that drew it."""
        h, w = x.shape[-2:]
        ops = torch.randint(len(self.names), (x.shape[0],))
        out = x.clone()
        for k in ops.unique().tolist():
            idx = (ops == k).nonzero().squeeze(1)  # drawn on the CPU; the images may live on a GPU
            name = self.names[k]
            at = to_device(idx, x.device)
            out[at] = apply_op(name, x[at], self._magnitudes(name, bins[idx], h, w))
        return out


class BatchRandAugment(_BatchedAugment):
    """RandAugment (num_ops ops of fixed magnitude per image) on uint8 (B, C, H, W); ops drawn per image."""

    space = RAND_AUGMENT_SPACE

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31):
        super().__init__(num_magnitude_bins)
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude {magnitude} must be in [0, {num_magnitude_bins})")
        self.num_ops = num_ops
        self.magnitude = magnitude

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bins = torch.full((x.shape[0],), self.magnitude, dtype=torch.long)
        for _ in range(self.num_ops):
            x = self._apply_round(x, bins)
        return x


class BatchTrivialAugmentWide(_BatchedAugment):
    """TrivialAugmentWide (one op, uniformly random magnitude bin per image) on uint8 (B, C, H, W)."""

    space = TRIVIAL_AUGMENT_SPACE

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bins = torch.randint(self.num_bins, (x.shape[0],))
        return self._apply_round(x, bins)


def magnitude_value(space: MagnitudeTable, name: str, bin_index: int, num_bins: int, h: int, w: int) -> float:
    """The unsigned magnitude of op `name` at `bin_index` (for tests and docs)."""
    fn, _ = space[name]
    return 0.0 if fn is None else float(fn(num_bins, h, w)[bin_index])


__all__ = [
    "BatchRandAugment",
    "BatchTrivialAugmentWide",
    "OPS",
    "RAND_AUGMENT_SPACE",
    "TRIVIAL_AUGMENT_SPACE",
    "apply_op",
    "magnitude_value",
]
