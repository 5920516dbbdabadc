"""A float VisionTransformer -> its int8 version, and the int8 structure a quantized checkpoint is loaded into.

What is quantized: every block's four linears (qkv, proj, fc1, fc2: ~98 % of a ViT-S/16's matmul FLOPs at 224 px).
The patch embedding (or conv stem), the norms, attention's own products, the pooling and the head stay as they
are and run in bf16 under autocast, as in the bf16 path: the first and last layers are the ones int8 hurts most and
they cost ~2 % of the FLOPs.

The model stays a VisionTransformer (every verb, hook and output works as before); it records how it was quantized
in `model.quantization`, which its checkpoint carries in the metadata (`quantization`), so that `load_model`
rebuilds the int8 layers before the weights load (`register_quantized_structure`, below).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..model.layers import Block
from ..model.serialization import CheckpointError, register_quantized_structure
from . import engine
from .layers import QuantizedBlock, QuantLinear

SCHEME = "int8"
FORMAT_VERSION = 1
LINEARS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))  # the block's quantized layers
Ranges = dict[str, tuple[float, float]]  # "blocks.3.mlp.fc1" -> calibrated (min, max) of that layer's input


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "quantization", None))


def describe(activations: str, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `quantization` record a quantized model carries (and its checkpoint's metadata)."""
    record = {
        "scheme": SCHEME,
        "version": FORMAT_VERSION,
        "weights": "int8, symmetric, per output channel",
        "activations": activations,  # "static": calibrated uint8 grid per layer input; "dynamic": per call
        "layers": "blocks: attn.qkv, attn.proj, mlp.fc1, mlp.fc2",
        "kernels": "oneDNN qlinear (torch.ops.onednn)",
    }
    if calibration:
        record["calibration"] = calibration
    return record


def quantize_model(
    model: nn.Module, ranges: Ranges | None = None, calibration: dict[str, Any] | None = None, inplace: bool = False
) -> nn.Module:
    """The int8 version of a float VisionTransformer (a copy unless `inplace`), in eval mode.

    ranges: calibrated input ranges of every quantized layer (`vitkit.quant.calibrate`): static activations;
    None: dynamic activations (each call finds its own grid, no calibration needed, slower: docs/speed.md).
    calibration: what to record about the calibration (source, image count) in `model.quantization`.
    """
    engine.require()
    if is_quantized(model):
        raise ValueError("this model is already quantized (its linears hold int8 weights)")
    if ranges is not None:
        missing = [name for name in layer_names(model) if name not in ranges]
        if missing:
            raise ValueError(f"no calibrated range for {len(missing)} layer(s), e.g. {missing[:3]}")
    model = model if inplace else copy.deepcopy(model)
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block):
            raise TypeError(f"block {i} is a {type(blk).__name__}; only vitkit Blocks are quantized")
        _quantize_block(blk, f"blocks.{i}", ranges)
    model.quantization = describe("static" if ranges is not None else "dynamic", calibration)
    return model.eval()


def layer_names(model: nn.Module) -> list[str]:
    """The dotted names of the linears quantize_model quantizes, in forward order."""
    return [f"blocks.{i}.{parent}.{name}" for i in range(len(model.blocks)) for parent, name in LINEARS]


def _quantize_block(blk: Block, prefix: str, ranges: Ranges | None) -> None:
    gammas = {"proj": _gamma(blk.ls1), "fc2": _gamma(blk.ls2)}  # LayerScale after proj and fc2: folded in
    for parent, name in LINEARS:
        owner = getattr(blk, parent)
        input_range = None if ranges is None else ranges[f"{prefix}.{parent}.{name}"]
        setattr(owner, name, QuantLinear.from_float(getattr(owner, name), input_range, gammas.get(name)))
    _to_quantized_block(blk)


def _to_quantized_block(blk: Block) -> None:
    """The block, its linears already int8, as a QuantizedBlock: LayerScale gone (folded in), the int8 forward."""
    blk.ls1, blk.ls2 = nn.Identity(), nn.Identity()
    blk.__class__ = QuantizedBlock  # same modules and state
    # "math": the attention the module path runs (attention maps, the shortened last block), and the sign by which
    # vitkit.fast's bf16 runner leaves the block to its own forward without first trying to build a bf16 plan for it
    # (~20 µs a block a call)
    blk.attn.backend = "math"


def _gamma(ls: nn.Module) -> torch.Tensor | None:
    return None if isinstance(ls, nn.Identity) else ls.gamma


def build_structure(model: nn.Module, record: dict[str, Any]) -> None:
    """Give a freshly built float model the int8 layers a quantized checkpoint's tensors fill (load_model)."""
    problems = check_record(record)
    if problems:
        raise CheckpointError(f"unsupported quantization record: {'; '.join(problems)}")
    static = record["activations"] == "static"
    for blk in model.blocks:
        for parent, name in LINEARS:
            owner = getattr(blk, parent)
            old = getattr(owner, name)
            setattr(owner, name, QuantLinear(old.in_features, old.out_features, old.bias is not None, static))
        _to_quantized_block(blk)
    model.quantization = record


def check_record(record: Any) -> list[str]:
    """What is wrong with a `quantization` record read from a file ([] when nothing)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object, got {type(record).__name__}"]
    problems = []
    if record.get("scheme") != SCHEME:
        problems.append(f"scheme {record.get('scheme')!r} (this vitkit reads {SCHEME!r})")
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        problems.append(f"version {version!r} (this vitkit reads versions up to {FORMAT_VERSION}; upgrade vitkit)")
    if record.get("activations") not in ("static", "dynamic"):
        problems.append(f"activations {record.get('activations')!r} (expected 'static' or 'dynamic')")
    return problems


def _build_checked(model: nn.Module, record: dict[str, Any]) -> None:
    build_structure(model, record)
    if not any(t.is_meta for t in model.state_dict().values()):  # the skeleton (shapes only) needs no kernels
        engine.require("this int8 checkpoint")


register_quantized_structure(SCHEME, _build_checked)
