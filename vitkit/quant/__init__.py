"""int8 inference: a ViT's block linears as int8 matmuls on oneDNN's x86 int8 kernels (docs/speed.md, "int8").

    from vitkit.quant import quantize_calibrated, quantize_model
    q = quantize_calibrated(model, "calib_images/", images=256)  # static activations, calibrated (any --data spec)
    q = quantize_model(model)                                     # dynamic activations: no calibration
    q.save("model.int8.safetensors")       # loads like any vitkit checkpoint (from_pretrained, vitkit predict)

A quantized model is still a VisionTransformer; it runs under the bf16 path's conditions (eval, no grad,
`torch.autocast("cpu", torch.bfloat16)`), its non-quantized layers in bf16. Importing this package registers the
int8 structure with vitkit's checkpoint loader (`import vitkit` does it).
"""

from .calibrate import DEFAULT_IMAGES, calibration_batches, observe_ranges, quantize_calibrated
from .convert import is_quantized, layer_names, quantize_model
from .engine import Int8Unavailable, available, require, unavailable_reason
from .layers import QuantizedBlock, QuantLinear

__all__ = [
    "DEFAULT_IMAGES",
    "Int8Unavailable",
    "QuantLinear",
    "QuantizedBlock",
    "available",
    "calibration_batches",
    "is_quantized",
    "layer_names",
    "observe_ranges",
    "quantize_calibrated",
    "quantize_model",
    "require",
    "unavailable_reason",
]
