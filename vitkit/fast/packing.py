"""Prepacked bf16 weights for oneDNN: the building piece of CPU bf16 inference (`inference.py`).

Inference engages by itself, for the model called the ordinary way, when all of these hold for a call:

    model.eval()  +  grad disabled (torch.inference_mode() / torch.no_grad())  +  input on the CPU
    +  bf16 compute: torch.autocast("cpu", torch.bfloat16), or bf16 weights and bf16 inputs (low_precision_inference)

Training, fp32, CUDA, autograd, torch.compile / export / tracing take the ordinary path, unchanged.

Why (benchmarks/inference_fast_path.py measures the whole path against the ordinary one):
- Every plain `F.linear` under autocast casts the fp32 weight to bf16 and has oneDNN re-lay it out for AMX, then
  adds the bias in a separate pass: a large share of each matmul at small batches. `pack` keeps one packed bf16
  copy per layer (`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's freezing uses) and the plans call
  `torch.ops.mkldnn._linear_pointwise` with the bias (and GELU for fc1, the residual add for proj and fc2) fused in.
- The packed copy lives beside the layer (a weak-keyed table: not in its state_dict, never copied or pickled) with
  a key of the parameters' version counters and storage: in-place updates (load_state_dict, EMA, `with no_grad:
  w.copy_()`) and `.to()` invalidate it, and so does `model.train()` (VisionTransformer.train calls `clear_cache`),
  needed because fused AdamW updates weights without bumping version counters. Writes through `.data` bypass
  both: call `clear_cache(model)` after them. Cost: one bf16 copy of each linear weight.

The mkldnn ops are private. `available()` probes them once (they exist since torch 2.0 and are in 2.11-2.14); where
they are missing or fail, every layer takes the ordinary path. Turn the fast path off with VITKIT_FAST_INFERENCE=0
or `with packing.disabled(): ...` (A/B measurements).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

_enabled = os.environ.get("VITKIT_FAST_INFERENCE", "1") != "0"
_available: bool | None = None  # probed on first use
# layer -> (key, packed bf16 weight, bf16 bias); block -> (key, its gathered plan) (`cached`). Kept beside the
# module, not on it, so state_dict, deepcopy and pickle never see the opaque oneDNN tensor; an entry goes away with
# its module.
_packed: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _probe() -> bool:
    """The private oneDNN ops exist, run, and agree with F.linear + GELU on a tiny case."""
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return False
        bf16_ok = getattr(ops, "_is_mkldnn_bf16_supported", None)
        if bf16_ok is not None and not bf16_ok():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((3, 16), (8, 16), (8,)))
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the first call may come from inside autocast
            y = ops._linear_pointwise(x, ops._reorder_linear_weight(w), b, "gelu", [], "none")
            ref = F.gelu(F.linear(x.float(), w.float(), b.float()))
        return y.shape == ref.shape and torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def available() -> bool:
    """Whether this torch build has working oneDNN bf16 linear kernels with prepacked weights."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the ordinary path inside the block (for A/B timings and reference outputs)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def engaged(module: nn.Module, x: torch.Tensor) -> bool:
    """True when this call of `module` on `x` should take the fast path (the conditions in the module docstring).

    Called by every layer on every call, so the checks that turn most calls away (fp32, training) come first: an
    fp32 call returns after three cheap checks (~0.5 µs; ~2.8 µs in the old order, 63 calls per ViT forward).
    """
    if not _enabled or module.training:
        return False
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return False
    elif x.dtype != torch.bfloat16:
        return False
    if torch.is_grad_enabled() or not x.is_cpu:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    return available()


def _key(layer: nn.Linear) -> tuple | None:
    """What the packed copy depends on; None for inference tensors (no version counter): those are not cached."""
    try:
        return tuple(
            (id(p), p.data_ptr(), p._version, p.dtype, tuple(p.shape)) if p is not None else None
            for p in (layer.weight, layer.bias)
        )
    except RuntimeError:
        return None


# Row counts (tokens x batch) at which a block's output projections (proj, fc2: out = the width) run faster from a
# weight packed for a one-row input, by width. oneDNN picks the packed layout from the row count it is told, and for
# these widths the layout it picks by default leaves mid-size products on one of the two threads. Measured by
# benchmarks/packing_rows.py (the 2-core AMX Xeon; one model with proj and fc2 packed each way, called alternately,
# whole forward):
#   width 384 (ViT-S/16):     batch 1 (197 rows) 1.07x, 2 (394) 1.11x, 4 (788) 1.10x; batch 8 (1576) 0.95x
#   width 192 (ViT-Ti/4 @32): batch 1 (65) 0.95x, 4 (260) 0.99x, 8 (520) 0.91x    -> not used
#   width 768 (ViT-B/16):     batch 1 (197) 1.02x, 2 (394) 1.01x (noise)          -> not used
# Outside these ranges, and for every other layer, the default packing.
ROW_PACKED_PROJECTIONS: dict[int, tuple[int, int]] = {384: (128, 1000)}


def pack(
    weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, ...) weight -> (packed bf16 oneDNN copy of it as (out, in), bias in bf16 or None). No caching.

    rows_hint: the input row count oneDNN should choose the packed layout for (None: its default); any row count
    still works with either layout, only the speed differs (ROW_PACKED_PROJECTIONS).
    """
    w2d = weight.detach().reshape(weight.shape[0], -1).to(torch.bfloat16)  # a conv's (out, C, p, p) flattens
    reorder = torch.ops.mkldnn._reorder_linear_weight
    packed_weight = reorder(w2d) if rows_hint is None else reorder(w2d, rows_hint)  # opaque oneDNN (AMX) layout
    return packed_weight, None if bias is None else bias.detach().to(torch.bfloat16)


def packable(layer: nn.Module) -> bool:
    """Whether the fast path can mirror `layer`'s ordinary op: a CPU fp32/bf16 weight, and an fp32 one only under
    autocast (outside it the ordinary path raises the usual dtype error). The caller has checked `engaged`."""
    w = layer.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return False
    return w.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")


def packed(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`layer`'s weight as one prepacked bf16 oneDNN copy and its bias in bf16: (packed weight, bias or None).

    Built on first use and rebuilt when the parameters change (see the module docstring). None where the fast path
    cannot mirror the ordinary op (`packable`), or for inference tensors (no version counter to key a cache on).
    The caller has checked `engaged`.
    """
    if not packable(layer):
        return None
    key = _key(layer)
    if key is None:
        return None
    cache = _packed.get(layer)
    if cache is None or cache[0] != key:
        cache = _packed[layer] = (key, *pack(layer.weight, layer.bias))
    return cache[1], cache[2]


def linear(
    layer: nn.Module, x: torch.Tensor, activation: str = "none", residual: torch.Tensor | None = None
) -> torch.Tensor | None:
    """bf16 `activation(x Wᵀ + b)` (+ `residual`), `layer`'s weight packed once; None where the fast path is off.

    layer: an nn.Linear, or any module whose `weight` flattens to (out, in) (a patch-embedding conv). x: (..., in)
    fp32 or bf16. residual: (..., out) added inside the matmul kernel (a oneDNN post-op; `activation` must then be
    "none"). Returns (..., out) bf16 (what autocast's linear returns), or None: the caller then runs the ordinary ops.
    """
    if not engaged(layer, x):
        return None
    wb = packed(layer)
    if wb is None:
        return None
    x = x.to(torch.bfloat16)
    if residual is not None:
        if activation != "none" or residual.shape[-1] != layer.weight.shape[0]:
            raise ValueError("a fused residual needs activation='none' and (..., out) shape")
        other = residual.to(torch.bfloat16).contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, *wb, "add")
    algorithm = "none" if activation == "gelu" else ""  # "none": exact erf GELU, as nn.GELU()
    return torch.ops.mkldnn._linear_pointwise(x, *wb, activation, [], algorithm)


def cached(module: nn.Module, key: tuple, build: Callable[[], object | None]) -> object | None:
    """A value kept beside `module` in the packed-weight table: `build()`'s result, rebuilt when `key` changes.

    For callers that gather several packed layers at once (a block's plan, `inference.py`). A None from `build` is
    not kept. `clear_cache` (which `VisionTransformer.train()` calls) drops these entries too.
    """
    entry = _packed.get(module)
    if entry is None or entry[0] != key:
        value = build()
        if value is None:
            return None
        entry = _packed[module] = (key, value)
    return entry[1]


def packed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that hold a packed copy now (tests, memory accounting)."""
    return [m for m in model.modules() if m in _packed]


def clear_cache(model: nn.Module) -> None:
    """Drop every packed copy in `model` (after writing weights through `.data`, or to free the memory)."""
    for m in model.modules():
        _packed.pop(m, None)
