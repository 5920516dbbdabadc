"""`--precision`: which arithmetic an inference verb runs a model in, resolved in one place.

    bf16  the model under bf16 autocast (the CPU fast path of vitkit/fast)
    fp32  the model as it is, no autocast
    int8  the block linears in int8 (vitkit.quant), the rest under bf16 autocast. A float model is quantized on
          load with dynamic activations (each layer's input grid found per call: no calibration data needed); a
          file written by `vitkit quantize` runs with the activation grids calibrated and stored in it (faster)

A quantized model holds int8 weights only, so it always runs in int8: "bf16" (every verb's default) runs it as it
is, and "fp32" is refused rather than silently ignored.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = ("bf16", "fp32", "int8")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")


def model_for(model: nn.Module, precision: str) -> tuple[nn.Module, bool]:
    """(the model to run, whether under bf16 autocast) for `precision`. int8 of a float model: a dynamic int8 copy
    (the model itself is untouched)."""
    from ..quant import is_quantized, quantize_model

    check_precision(precision)
    if is_quantized(model):
        if precision == "fp32":
            raise ValueError(
                "this model holds int8 weights (a `vitkit quantize` output): it runs in int8 only; leave out "
                "--precision fp32, or use the float checkpoint it was quantized from"
            )
        return model, True
    if precision == "int8":
        return quantize_model(model), True
    return model, precision == "bf16"


def autocast(device: torch.device | str, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `bf16`, else nothing."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, torch.bfloat16) if bf16 else contextlib.nullcontext()


def effective_precision(model: nn.Module, precision: str) -> str:
    """What the model will actually run in: "int8" for a quantized model, else `precision`."""
    from ..quant import is_quantized

    return "int8" if is_quantized(model) else precision
