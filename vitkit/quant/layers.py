"""The int8 layers: QuantLinear (one linear, on its own) and QuantizedBlock (a block whose linears are int8, run as
one straight-line plan).

QuantLinear holds what its file holds: the int8 weight (`weight`, (out, in)), a scale per output channel
(`weight_scale`), the float bias, and for static activations the calibrated uint8 grid of its input (`input_scale`,
`input_zero_point`). Without those two the grid is found from each call's input (dynamic). The oneDNN-packed copy
of the weight lives beside the layer, never in its state_dict (like vitkit.fast's packed bf16 weights).

QuantizedBlock's plan, for static activations, does what a module-by-module run cannot:
  - LayerNorm and the quantization of its output in one F.layer_norm call: the grid is folded into the norm's
    weight and bias (gamma / s, beta / s + zero point + 0.5), so the output only needs saturating and truncating;
  - fc1 writes uint8 straight at fc2's input grid, GELU and the requantization inside oneDNN's kernel (the MLP's
    hidden activation, the largest tensor of a block, is never written as floats);
  - the residual adds are post-ops of proj and fc2, as in the bf16 plan.
Attention runs in bf16, as in the bf16 fast path (`_attention`). LayerScale is folded into proj and fc2 when the
block is quantized (gamma * (x Wᵀ + b) = x (gamma W)ᵀ + gamma b).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..fast import kernels
from ..fast.blocks import global_hooks
from ..model.layers import Block
from . import engine

_ql = None  # torch.ops.onednn.qlinear_pointwise, looked up on first use (after the engine check)

# Attention without vitkit's C++ kernel: explicit matmul-softmax-matmul on CPUs without AMX, SDPA with it. At ViT-S/16's
# 197 tokens, bf16, one block's attention (benchmarks/int8_linear.py --attention): on the 2-core AVX512-BF16 EPYC
# (no AMX) explicit 7.2 ms vs SDPA 17.3 ms at batch 32, 0.25 vs 0.51 ms at batch 1; on the 2-core AMX Xeon SDPA is
# the faster (benchmarks/attention_backend.py: 14.7 vs 18.5 ms at 197 tokens), and the C++ kernel faster still.
_is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
EXPLICIT_ATTENTION = not (_is_amx is not None and _is_amx())


def _qlinear():
    global _ql
    if _ql is None:
        _ql = torch.ops.onednn.qlinear_pointwise
    return _ql


class Prepared(NamedTuple):
    """One QuantLinear as the kernel takes it: weight arguments, bias, and the static input grid (or None)."""

    weight: tuple  # (packed int8 weight, fp32 scale per channel, int64 zero points (all 0))
    bias: torch.Tensor | None  # fp32
    input: tuple[float, int] | None  # static: (scale, zero point); None: dynamic
    inv_scale: float  # 1 / input scale (static)
    offset: torch.Tensor  # (1,) fp32: zero point + 0.5 (static)


# layer -> (key, Prepared); block -> (key, BlockPlan). Beside the modules, not on them: the packed weight is an
# opaque oneDNN tensor that state_dict, deepcopy and pickle must never see.
_prepared: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _key(module: nn.Module, hooks: bool = False) -> tuple | None:
    """What a prepared copy depends on: the storage and version of every parameter and buffer below `module`; with
    hooks=True, None when a module below `module` has a forward hook (a plan would not call it).

    A plain walk over the modules' own dicts: it runs for every block on every call (a third of the cost of
    `parameters()` + `buffers()`)."""
    key: list = []
    stack = [module]
    while stack:
        m = stack.pop()
        if hooks and m is not module and (m._forward_hooks or m._forward_pre_hooks):
            return None
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None:
                    key.append((t.data_ptr(), _version(t), t.dtype))
        stack.extend(c for c in m._modules.values() if c is not None)
    return tuple(key)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: their storage cannot change in place
        return -1


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W int8 per output channel and x quantized to uint8 per tensor: static (the grid calibrated
    and stored in `input_scale` / `input_zero_point`) or dynamic (each call's min and max). (..., in) float in,
    (..., out) out in the input's dtype (bf16 or fp32)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, static: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.static = static
        if static:
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))

    @classmethod
    def from_float(
        cls, linear: nn.Linear, input_range: tuple[float, float] | None = None, gamma: torch.Tensor | None = None
    ) -> QuantLinear:
        """Quantize `linear` (its weight per output channel). input_range: the calibrated (min, max) of its input
        (static activations), None for dynamic. gamma: a LayerScale after the layer, folded in."""
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        if gamma is not None:
            g = gamma.detach().float()
            weight, bias = weight * g[:, None], None if bias is None else bias * g
        q = cls(linear.in_features, linear.out_features, bias is not None, static=input_range is not None)
        q.weight, q.weight_scale = engine.per_channel_int8(weight)
        if bias is not None:
            q.bias = bias.clone()
        if input_range is not None:
            scale, zero_point = engine.affine_params(*input_range)
            q.input_scale = torch.tensor(scale, dtype=torch.float32)
            q.input_zero_point = torch.tensor(zero_point, dtype=torch.int32)
        return q.to(linear.weight.device)

    def prepared(self) -> Prepared:
        """The kernel's arguments, packed on first use and again after the buffers change (load_state_dict)."""
        key = _key(self)
        entry = _prepared.get(self)
        if entry is None or entry[0] != key:
            entry = _prepared[self] = (key, self._prepare())
        return entry[1]

    def _prepare(self) -> Prepared:
        engine.require()
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        weight = (engine.prepack(self.weight), self.weight_scale.detach().float().contiguous(), zeros)
        bias = None if self.bias is None else self.bias.detach().float().contiguous()
        if not self.static:
            return Prepared(weight, bias, None, 1.0, torch.zeros(1))
        scale, zero_point = float(self.input_scale), int(self.input_zero_point)
        if not scale > 0:
            raise ValueError(f"input_scale {scale} of an int8 layer must be positive; the checkpoint is damaged")
        return Prepared(weight, bias, (scale, zero_point), 1 / scale, torch.tensor([zero_point + 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.jit.is_tracing() or (torch.is_grad_enabled() and x.requires_grad):
            return self.reference(x)  # exported graphs; gradients (class-specific explanations) pass straight through
        p = self.prepared()
        out = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
        if p.input is None:
            q, scale, zero_point = engine.quantize_dynamic(x)
            return _qlinear()(q, scale, zero_point, *p.weight, p.bias, 1.0, 0, out, "none", [], "")
        q = engine.quantize(x, p.inv_scale, p.offset)
        return _qlinear()(q, *p.input, *p.weight, p.bias, 1.0, 0, out, "none", [], "")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same arithmetic in standard ops (quantize, dequantize, float matmul): what an exported graph holds.
        ONNX gets QuantizeLinear / DequantizeLinear on the input and a per-channel DequantizeLinear of the int8
        weight, the pattern ONNX Runtime fuses into an int8 matmul. Differentiable in x (the quantization passes
        gradients straight through inside the grid), which oneDNN's kernel is not."""
        x = x.float()
        if self.static:
            scale, zero_point = self.input_scale.float(), self.input_zero_point.to(torch.int64)
        else:
            lo, hi = torch.aminmax(x)
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = ((hi - lo) / engine.QMAX).clamp_min(1e-8)
            zero_point = torch.round(-lo / scale).clamp(0, engine.QMAX).to(torch.int64)
        x = torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), 0, engine.QMAX)
        scale = self.weight_scale.float()
        if export_ops() is None:  # a torch without them: the same weight, dequantized by hand
            w = self.weight.float() * scale[:, None]
        else:
            zeros = torch.zeros_like(scale, dtype=torch.int64)
            w = torch.ops.quantized_decomposed.dequantize_per_channel(
                self.weight, scale, zeros, 0, -engine.WMAX, engine.WMAX, torch.int8
            )
        return F.linear(x, w, None if self.bias is None else self.bias.float())

    def extra_repr(self) -> str:
        kind = "static" if self.static else "dynamic"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {kind} activations"


def export_ops() -> object | None:
    """torch.ops.quantized_decomposed (its per-channel dequantize becomes ONNX's DequantizeLinear), registered by
    importing torch.ao's module; None where this torch no longer has it. The ONNX exporter looks its translations
    up when an export starts, so the exporter calls this first (`vitkit.infer.export.exportable_copy`)."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:
        return None
    return torch.ops.quantized_decomposed


class BlockPlan(NamedTuple):
    """A QuantizedBlock's arguments for its plan (static: norms folded with their linear's input grid)."""

    norm1: tuple  # F.layer_norm's (shape, weight, bias, eps)
    norm2: tuple
    qkv: Prepared
    proj: Prepared
    fc1: Prepared
    fc2: Prepared
    num_heads: int
    head_dim: int
    qk_norm: tuple | None
    static: bool


class QuantizedBlock(Block):
    """A Block with int8 linears (QuantLinear) and its LayerScale folded into them.

    forward: for inference (no grad, CPU, no attention map asked for, no hook below the block) the fused plan (module
    docstring); otherwise the Block's own forward over the modules (each QuantLinear runs on its own), which is also
    what vitkit.fast's shortened last block ("token" pooling) calls.
    """

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        plan = None if need_weights or torch.is_grad_enabled() or not x.is_cpu or _capturing() else self.plan()
        if plan is None:
            return super().forward(x, need_weights)
        return run_plan(plan, x), None

    def plan(self) -> BlockPlan | None:
        """The block's plan, rebuilt when a tensor below it changes; None while a hook below the block would not see
        the plan's calls (a hook on the block itself runs as on any module)."""
        if global_hooks():
            return None
        key = _key(self, hooks=True)
        if key is None:
            return None
        entry = _prepared.get(self)
        if entry is None or entry[0] != key:
            entry = _prepared[self] = (key, self._build_plan())
        return entry[1]

    def _build_plan(self) -> BlockPlan:
        a, mlp = self.attn, self.mlp
        layers = (a.qkv, a.proj, mlp.fc1, mlp.fc2)
        if not all(isinstance(m, QuantLinear) for m in layers):
            raise TypeError("a QuantizedBlock's qkv, proj, fc1 and fc2 must be QuantLinear layers")
        qkv, proj, fc1, fc2 = (m.prepared() for m in layers)
        static = all(m.static for m in layers)
        norm1, norm2 = _norm_args(self.norm1), _norm_args(self.norm2)
        if static:  # the norms write their linear's input grid: LayerNorm and quantization in one call
            norm1, norm2 = _fold_grid(norm1, qkv), _fold_grid(norm2, fc1)
        qk_norm = None if isinstance(a.q_norm, nn.Identity) else (_norm_args(a.q_norm), _norm_args(a.k_norm))
        return BlockPlan(norm1, norm2, qkv, proj, fc1, fc2, a.num_heads, a.head_dim, qk_norm, static)


def _capturing() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


def _norm_args(norm: nn.LayerNorm) -> tuple:
    weight = None if norm.weight is None else norm.weight.detach().float()
    bias = None if norm.bias is None else norm.bias.detach().float()
    return (norm.normalized_shape, weight, bias, norm.eps)


def _fold_grid(norm: tuple, p: Prepared) -> tuple:
    """LayerNorm arguments whose output is already on `p`'s input grid, +0.5: y / s + z + 0.5 = x̂ (g / s) +
    (b / s + z + 0.5). Saturating and truncating that gives the rounded uint8 input."""
    shape, weight, bias, eps = norm
    (dim,) = shape
    weight = torch.ones(dim) if weight is None else weight
    bias = torch.zeros(dim) if bias is None else bias
    return (shape, weight * p.inv_scale, bias * p.inv_scale + p.offset, eps)


def run_plan(p: BlockPlan, x: torch.Tensor) -> torch.Tensor:
    """One block: x (B, N, D) float -> (B, N, D) in x's dtype (the residual stream's: bf16 in vitkit's fast path)."""
    ql = _qlinear()
    B, N, C = x.shape
    bf16, out = torch.bfloat16, x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
    x = x.reshape(B * N, C).to(out).contiguous()
    with torch.autocast("cpu", enabled=False):  # every dtype below is chosen here, not by an enclosing autocast
        if p.static:
            u = _saturate(F.layer_norm(x.float(), *p.norm1))  # LN1 and qkv's input quantization
            qkv = ql(u, *p.qkv.input, *p.qkv.weight, p.qkv.bias, 1.0, 0, bf16, "none", [], "")
        else:
            u, s, z = engine.quantize_dynamic(F.layer_norm(x, *p.norm1))
            qkv = ql(u, s, z, *p.qkv.weight, p.qkv.bias, 1.0, 0, bf16, "none", [], "")
        o = _attention(p, qkv, B, N)  # (B*N, D) bf16
        x = _linear_add(p.proj, o, x, out)  # x + proj(o), the add fused
        if p.static:  # LN2 on fc1's grid; fc1 writes GELU's output on fc2's grid, as uint8
            u = _saturate(F.layer_norm(x.float(), *p.norm2))
            (s2, z2) = p.fc2.input
            h = ql(u, *p.fc1.input, *p.fc1.weight, p.fc1.bias, s2, z2, torch.uint8, "gelu", [], "none")
            x = _linear_add(p.fc2, h, x, out, quantized=True)
        else:
            u, s, z = engine.quantize_dynamic(F.layer_norm(x, *p.norm2))
            h = ql(u, s, z, *p.fc1.weight, p.fc1.bias, 1.0, 0, bf16, "gelu", [], "none")
            x = _linear_add(p.fc2, h, x, out)
    return x.view(B, N, C)


def _attention(p: BlockPlan, qkv: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """softmax(q kᵀ / √d) v in bf16 from the qkv output (B*N, 3D) -> (B*N, D): vitkit's C++ kernel where it is built
    (AMX CPUs), else the faster of SDPA and explicit matmul-softmax-matmul on this CPU (EXPLICIT_ATTENTION)."""
    H, hd = p.num_heads, p.head_dim
    if p.qk_norm is None and kernels.usable(N, hd, N):
        return kernels.attention(qkv.view(B, N, 3 * H * hd), H, N, hd**-0.5).view(B * N, H * hd)
    q, k, v = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
    if p.qk_norm is not None:
        q, k = F.layer_norm(q, *p.qk_norm[0]), F.layer_norm(k, *p.qk_norm[1])
    if not EXPLICIT_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * N, H * hd)
    q3, k3, v3 = (t.reshape(B * H, N, hd) for t in (q, k, v))
    scores = torch.baddbmm(q3.new_zeros(()), q3, k3.transpose(1, 2), beta=0.0, alpha=hd**-0.5)  # (B*H, N, N)
    o = torch.bmm(scores.softmax(dim=-1), v3)  # (B*H, N, hd)
    return o.view(B, H, N, hd).transpose(1, 2).reshape(B * N, H * hd)


def _saturate(y: torch.Tensor) -> torch.Tensor:
    return y.clamp_(0, engine.QMAX).to(torch.uint8)


def _linear_add(
    p: Prepared, h: torch.Tensor, residual: torch.Tensor, out: torch.dtype, quantized: bool = False
) -> torch.Tensor:
    """residual + h Wᵀ + b, the add a post-op of the int8 matmul. h: float (quantized here) or, with quantized=True,
    uint8 already on p's grid."""
    ql = _qlinear()
    if quantized:
        u, grid = h, p.input
    elif p.input is None:
        u, *grid = engine.quantize_dynamic(h)
    else:
        u, grid = engine.quantize(h, p.inv_scale, p.offset), p.input
    return ql.binary(u, *grid, *p.weight, residual, p.bias, 1.0, 0, out, 1.0, 0, "add", 1.0, "none", [], "")
