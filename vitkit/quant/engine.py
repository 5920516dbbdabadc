"""The int8 kernels: oneDNN's quantized linear as PyTorch ships it (`torch.ops.onednn.qlinear_pointwise`).

Why this op (benchmarks/int8_linear.py times every candidate on one ViT-S/16 block's linears; docs/speed.md has the
table): it is the kernel PyTorch's own x86 int8 path (PT2E quantization lowered by inductor) calls, maintained in
PyTorch's core, and it takes plain uint8 activations and int8 weights (no quantized tensor types, which 2.14
deprecates), per-channel weight scales, a bf16 or fp32 output, and fused post-ops: GELU, requantization of the
output to uint8, and a residual add. oneDNN runs it on AVX512-VNNI or AMX int8 instructions where the CPU has them.

The layout: activations uint8 with a per-tensor scale and zero point (asymmetric: LayerNorm and GELU outputs are not
centred), weights int8 per output channel, symmetric. A uint8 activation is what oneDNN's fast kernels take: int8
activations fall back to its reference kernel, thousands of times slower.
"""

from __future__ import annotations

import torch

QMAX = 255  # uint8 activations: 0..255
WMAX = 127  # int8 weights, symmetric: -127..127 (no -128, so that the scale is the same on both sides)

CHUNK_ELEMENTS = 1 << 20  # quantize() works on at most this many elements at once (4 MiB of fp32)

_unavailable: str | None | bool = False  # False: not probed yet; None: available; str: why not


class Int8Unavailable(ImportError):
    """This PyTorch build cannot run vitkit's int8 kernels (named with the reason and what to do)."""


def _probe() -> str | None:
    """None when the oneDNN int8 linear exists, runs and agrees with a float reference; else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    try:
        ops = torch.ops.onednn
        qlinear, prepack = ops.qlinear_pointwise, ops.qlinear_prepack
    except (AttributeError, RuntimeError):
        return "this PyTorch build lacks torch.ops.onednn.qlinear_pointwise (oneDNN's int8 linear)"
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (5, 32), generator=g, dtype=torch.uint8)
        w = torch.randint(-WMAX, WMAX + 1, (8, 32), generator=g, dtype=torch.int8)
        w_scale, bias = torch.rand(8, generator=g) / 100, torch.randn(8, generator=g)
        zero = torch.zeros(8, dtype=torch.long)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            y = qlinear(x, 0.05, 100, prepack(w, None), w_scale, zero, bias, 1.0, 0, torch.float32, "none", [], "")
        ref = torch.nn.functional.linear((x.float() - 100) * 0.05, w.float() * w_scale[:, None], bias)
        if y.shape != ref.shape or not torch.allclose(y, ref, atol=1e-3, rtol=1e-3):
            return "oneDNN's int8 linear gives wrong results on this machine"
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return f"oneDNN's int8 linear fails on this machine ({str(e).splitlines()[0][:120]})"
    return None


def unavailable_reason() -> str | None:
    """Why int8 inference cannot run here, or None when it can (probed once)."""
    global _unavailable
    if _unavailable is False:
        _unavailable = _probe()
    return _unavailable  # type: ignore[return-value]


def available() -> bool:
    return unavailable_reason() is None


def require(what: str = "int8 inference") -> None:
    """Raise Int8Unavailable, naming the reason, unless the int8 kernels run here."""
    reason = unavailable_reason()
    if reason is not None:
        raise Int8Unavailable(
            f"{what} needs oneDNN's int8 linear (torch.ops.onednn.qlinear_pointwise, x86 CPUs); {reason} "
            f"(torch {torch.__version__}). Use a PyTorch build for x86 with oneDNN, or the float checkpoint with "
            "--precision bf16"
        )


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 weight, fp32 scale per output channel): w ≈ q * scale, |q| <= 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / WMAX  # (out,)
    return torch.round(w / scale[:, None]).clamp_(-WMAX, WMAX).to(torch.int8), scale


def affine_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of the uint8 grid that covers [lo, hi] and holds 0 exactly (min/max calibration)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / QMAX
    return scale, int(min(max(round(-lo / scale), 0), QMAX))


def quantize(x: torch.Tensor, inv_scale: float, offset: torch.Tensor) -> torch.Tensor:
    """x float -> uint8 round(x / scale) + zero point, saturated; offset: a (1,) fp32 tensor of zero point + 0.5.

    Three passes: the (1,)-shaped fp32 offset makes the sum fp32 even for a bf16 x (a bf16 sum could not hold the
    fraction that decides the rounding), and the conversion's truncation turns the +0.5 into rounding. A large x goes
    in row chunks of at most CHUNK_ELEMENTS: a whole fp32 intermediate of ViT-S/16's MLP activation at batch 32
    (39 MB) lies above glibc's mmap threshold, so its fresh pages would fault in on every call (that conversion took
    longer than the int8 matmul after it; chunked, a ninth of that).
    """
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    if rows.shape[0] <= step:
        return torch.add(offset, x, alpha=inv_scale).clamp_(0, QMAX).to(torch.uint8)
    out = torch.empty(rows.shape, dtype=torch.uint8)
    for start in range(0, rows.shape[0], step):
        out[start : start + step].copy_(torch.add(offset, rows[start : start + step], alpha=inv_scale).clamp_(0, QMAX))
    return out.view(x.shape)


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """x float -> (uint8 x, its scale, its zero point), the grid covering x's own min and max (one extra pass)."""
    lo, hi = torch.aminmax(x.detach())
    scale, zero_point = affine_params(lo.item(), hi.item())  # on the CPU .item() costs no device sync
    return quantize(x, 1 / scale, torch.tensor([zero_point + 0.5])), scale, zero_point


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) weight -> oneDNN's packed layout for the int8 kernel (an opaque tensor; never saved)."""
    return torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
