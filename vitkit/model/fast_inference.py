"""The CPU bf16 inference fast path: weights prepacked once for oneDNN, GELU fused into fc1, a bf16 residual stream.

It engages by itself, for the model called the ordinary way, when all of these hold for a call:

    model.eval()  +  grad disabled (torch.inference_mode() / torch.no_grad())  +  input on the CPU
    +  bf16 compute: torch.autocast("cpu", torch.bfloat16), or bf16 weights and bf16 inputs (low_precision_inference)

Training, fp32, CUDA, autograd, torch.compile / export / tracing take the ordinary path, unchanged.

Why, measured on the 2-core AMX Xeon, ViT-S/16 @224, torch 2.14.1 (profile and A/B in benchmarks/README.md):
- Every plain `F.linear` under autocast casts the fp32 weight to bf16 and has oneDNN re-lay it out for AMX, then
  adds the bias in a separate pass: 30-40 % of each matmul at batch 1, ~15 % at batch 32. `linear` below keeps
  one packed bf16 copy per layer (`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's freezing uses)
  and calls `torch.ops.mkldnn._linear_pointwise` with the bias (and GELU for fc1) fused in.
- GELU as a post-op of fc1 saves a pass over the (B, N, 4D) activations.
- Under autocast the residual stream stays fp32 (bf16 branch + fp32 stream -> fp32), so every LayerNorm reads fp32
  and every linear re-casts its input. The model casts the stream to bf16 once after the position embedding
  (`VisionTransformer._encode`); LayerNorm and softmax still accumulate in fp32 inside PyTorch's CPU kernels.
Logits stay within bf16 tolerance of the fp32 model (tests/test_fast_inference.py).

The packed copy lives on the layer (not in its state_dict, never copied or pickled) with a key of the parameters'
version counters and storage: in-place updates (load_state_dict, EMA, `with no_grad: w.copy_()`) and `.to()`
invalidate it, and so does `model.train()` — needed because fused AdamW updates weights without bumping version
counters. Writes through `.data`, or a fused optimizer stepping a model left in eval mode, bypass both: call
`clear_cache(model)` after them. Cost: one bf16 copy of each linear weight (half the fp32 weights' memory).

The mkldnn ops are private. `available()` probes them once (they exist since torch 2.0 and are in 2.11-2.14); where
they are missing or fail, every layer takes the ordinary path. Turn the fast path off with VITKIT_FAST_INFERENCE=0
or `with fast_inference.disabled(): ...` (A/B measurements).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_enabled = os.environ.get("VITKIT_FAST_INFERENCE", "1") != "0"
_available: bool | None = None  # probed on first use


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
    """True when this call of `module` on `x` should take the fast path (the conditions in the module docstring)."""
    if not _enabled or module.training or torch.is_grad_enabled() or x.device.type != "cpu":
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
    else:
        bf16 = x.dtype == torch.bfloat16
    return bf16 and available()


def _key(layer: nn.Linear) -> tuple | None:
    """What the packed copy depends on; None for inference tensors (no version counter): those are not cached."""
    try:
        return tuple(
            (id(p), p.data_ptr(), p._version, p.dtype, tuple(p.shape)) if p is not None else None
            for p in (layer.weight, layer.bias)
        )
    except RuntimeError:
        return None


def linear(layer: nn.Linear, x: torch.Tensor, activation: str = "none") -> torch.Tensor | None:
    """bf16 `activation(x Wᵀ + b)` with `layer`'s weight packed once; None when the fast path does not apply.

    x: (..., in) fp32 or bf16. Returns (..., out) bf16 (what autocast's linear returns), or None: the caller then
    runs the ordinary F.linear.
    """
    if not engaged(layer, x):
        return None
    w = layer.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    if w.dtype != torch.bfloat16 and not torch.is_autocast_enabled("cpu"):
        return None  # bf16 input, fp32 weight, no autocast: the ordinary path raises the usual dtype error
    key = _key(layer)
    if key is None:
        return None
    cache = layer.__dict__.get("_packed")
    if cache is None or cache[0] != key:
        ops = torch.ops.mkldnn
        packed = ops._reorder_linear_weight(w.detach().to(torch.bfloat16))  # opaque oneDNN (AMX) layout
        bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
        cache = layer.__dict__["_packed"] = (key, packed, bias)
    algorithm = "none" if activation == "gelu" else ""  # "none": exact erf GELU, as nn.GELU()
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), cache[1], cache[2], activation, [], algorithm)


def clear_cache(model: nn.Module) -> None:
    """Drop every packed copy in `model` (after writing weights through `.data`, or to free the memory)."""
    for m in model.modules():
        m.__dict__.pop("_packed", None)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) that takes the fast path when it applies.

    `activation="gelu"` returns GELU(x Wᵀ + b): fused into the matmul on the fast path, F.gelu after it otherwise.
    """

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
        y = linear(self, x, activation)
        if y is not None:
            return y
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if activation == "gelu" else y

    def train(self, mode: bool = True) -> Linear:
        # Back to training drops the packed copy: fused AdamW (`torch._fused_adamw_`, the trainer's default) updates
        # weights in place WITHOUT bumping their version counters, so the key alone would keep a stale copy across
        # an eval -> train -> eval cycle (found by tests/test_train_resume.py).
        if mode:
            self.__dict__.pop("_packed", None)
        return super().train(mode)

    def __getstate__(self) -> dict:  # deepcopy / pickle: the packed copy is an opaque tensor and is rebuilt on use
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}
