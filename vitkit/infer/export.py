"""Export a VisionTransformer to a portable graph: ONNX (any runtime) or torch.export's `.pt2`.

With `dynamic=True` the graph accepts any batch size and any image size that the patch size divides: the model
is rebuilt with `dynamic_img_size=True`, so the learned position embedding is resampled *inside the graph*
(bicubic with antialias, as in PyTorch; it becomes one ONNX `Resize` node with `antialias=1`, opset >= 18).

The ONNX file carries what is needed to predict with it alone, in its `metadata_props`: the model config,
the preprocessing spec, the labels and the opset (keys in `METADATA_KEYS`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write
from ..model import VisionTransformer
from ..model.serialization import apply_quantization, apply_task
from ..version import __version__

DEFAULT_OPSET = 18  # the first opset whose Resize has `antialias` (needed for in-graph pos-embed resampling)
MIN_OPSET = 18
ONNX_FORMAT = "vitkit-onnx"
INPUT_NAME = "pixels"  # (B, C, H, W) float32, normalised as the `preprocess` metadata says
OUTPUT_NAME = "logits"  # (B, classes) float32
METADATA_KEYS = ("vitkit.format", "vitkit.config", "vitkit.preprocess", "vitkit.labels", "vitkit.opset")
_PROTOBUF_LIMIT = 2**31 - 1  # one ONNX protobuf holds at most 2 GiB; bigger models keep weights beside it


@dataclass
class ExportResult:
    """What was written, and how closely the exported graph reproduces PyTorch on a check input."""

    path: Path
    format: str  # "onnx" | "pt2"
    dynamic: bool
    opset: int | None  # ONNX opset (None for pt2)
    checked_shape: tuple[int, ...] | None  # the (B, C, H, W) input of the parity check
    max_abs_diff: float | None  # max |exported - PyTorch| on that input (fp32), None when not checked


def exportable_copy(model: VisionTransformer, dynamic: bool) -> VisionTransformer:
    """An fp32, CPU, eval-mode copy of the model; with `dynamic` built with dynamic_img_size=True.

    An int8 model (vitkit.quant) stays int8: its int8 weights and grids are copied as they are, and its quantized
    layers trace as quantize / dequantize pairs around float matmuls (QuantLinear.reference), which ONNX holds as
    QuantizeLinear / DequantizeLinear and ONNX Runtime runs as int8 matmuls.
    """
    cfg = model.cfg.replace(dynamic_img_size=True) if dynamic else model.cfg
    copy = VisionTransformer(cfg, preprocess=model.preprocess, labels=model.labels)
    apply_task(copy, getattr(model, "task", None))  # a task with its own head (segmentation) rebuilds it
    if getattr(model, "quantization", None):
        from ..quant.layers import export_ops

        apply_quantization(copy, model.quantization)
        export_ops()  # before the exporter starts: it reads the ops it can translate then
    state = model.state_dict()
    copy.load_state_dict(
        {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in state.items()}
    )
    return copy.eval()


def example_input(model: VisionTransformer, batch: int = 2) -> torch.Tensor:
    """A random (B, C, H, W) input at the model's built size."""
    H, W = model.cfg.img_size
    return torch.randn(batch, model.cfg.in_chans, H, W)


def dynamic_shapes(model: VisionTransformer, max_side: int = 4096) -> dict:
    """torch.export dimensions: any batch; H and W any multiple of the patch size up to `max_side` pixels."""
    from torch.export import Dim

    ph, pw = model.cfg.patch_size
    grid_h = Dim("grid_h", min=1, max=max_side // ph)
    grid_w = Dim("grid_w", min=1, max=max_side // pw)
    return {"x": {0: Dim("batch", min=1, max=65536), 2: ph * grid_h, 3: pw * grid_w}}


def onnx_metadata(model: VisionTransformer, opset: int, dynamic: bool) -> dict[str, str]:
    """The vitkit entries written into the ONNX file's metadata_props."""
    meta = {
        "vitkit.format": ONNX_FORMAT,
        "vitkit.version": __version__,
        "vitkit.config": model.cfg.to_json(),
        "vitkit.preprocess": json.dumps(model.preprocess.to_dict()),
        "vitkit.opset": str(opset),
        "vitkit.dynamic": json.dumps(dynamic),
        "vitkit.input": INPUT_NAME,
        "vitkit.output": OUTPUT_NAME,
    }
    if model.labels is not None:
        meta["vitkit.labels"] = json.dumps(list(model.labels))
    if getattr(model, "task", None):  # how the outputs read (multi-label: sigmoids and the threshold)
        meta["vitkit.task"] = json.dumps(model.task)
    return meta


def export_onnx(
    model: VisionTransformer,
    path: str | Path,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> ExportResult:
    """Write the model as an ONNX graph with torch.onnx's dynamo exporter (onnxscript).

    Args:
        model: the model to export (its weights are copied to fp32 on CPU; the model itself is untouched).
        path: the `.onnx` file to write. Models over 2 GiB store their weights in `<path>.data` beside it.
        dynamic: any batch size and image size (multiples of the patch size); else fixed at batch 1 and the
            model's built size.
        opset: ONNX opset, >= 18.
        check: run the file in onnxruntime (when installed) and compare with PyTorch on one input.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx extra: pip install 'vitkit[onnx]' ({e})") from None
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is too old: the position-embedding resampling needs Resize with antialias (opset >= "
            f"{MIN_OPSET}); use --opset {DEFAULT_OPSET} or newer"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = exportable_copy(model, dynamic)
    x = example_input(net, batch=2 if dynamic else 1)
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # the exporter warns about internals the user cannot act on
        program = torch.onnx.export(
            net,
            (x,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes(net) if dynamic else None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    program.model.metadata_props.update(onnx_metadata(net, opset, dynamic))
    _save_onnx(program, path, weight_bytes=sum(t.numel() * t.element_size() for t in net.state_dict().values()))
    result = ExportResult(path, "onnx", dynamic, opset, None, None)
    if check:
        result = _check_onnx(net, result)
    return result


def _save_onnx(program, path: Path, weight_bytes: int) -> None:
    """Save atomically (vitkit.files); above 2 GiB of weights, as a graph plus an external data file.

    The external-data case is written in place: the graph names its data file, so the two cannot be renamed
    into place one by one.
    """
    if weight_bytes >= _PROTOBUF_LIMIT:
        program.save(str(path), external_data=True)
        return
    with atomic_write(path) as tmp:
        program.save(str(tmp), external_data=False)


def _check_onnx(net: VisionTransformer, result: ExportResult) -> ExportResult:
    """Compare onnxruntime with PyTorch (fp32) on a random input; larger than built when the graph is dynamic.

    It runs onnxruntime directly rather than through onnx_backend.OnnxModel: that module exports models itself,
    so it imports this one, and imports go one way.
    """
    try:
        import onnxruntime
    except ImportError:
        return result
    H, W = net.cfg.img_size
    ph, pw = net.cfg.patch_size
    shape = (3, net.cfg.in_chans, H + ph, W + 2 * pw) if result.dynamic else (1, net.cfg.in_chans, H, W)
    x = torch.randn(shape)
    with torch.inference_mode():
        ref = net(x)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    return ExportResult(**{**result.__dict__, "checked_shape": shape, "max_abs_diff": (out - ref).abs().max().item()})


def export_pt2(model: VisionTransformer, path: str | Path, dynamic: bool = True, check: bool = True) -> ExportResult:
    """Write a torch.export ExportedProgram (`torch.export.load(path).module()(x)` runs it).

    The vitkit metadata (config, preprocess, labels) is stored as the archive's extra file `vitkit.json`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = exportable_copy(model, dynamic)
    x = example_input(net, batch=2 if dynamic else 1)
    with torch.inference_mode(False):
        program = torch.export.export(net, (x,), dynamic_shapes=dynamic_shapes(net) if dynamic else None)
    meta = {k.removeprefix("vitkit."): v for k, v in onnx_metadata(net, 0, dynamic).items() if k != "vitkit.opset"}
    meta["format"] = "vitkit-pt2"
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: no warning for names without .pt2
        torch.export.save(program, f, extra_files={"vitkit.json": json.dumps(meta)})
    result = ExportResult(path, "pt2", dynamic, None, None, None)
    if check:
        H, W = net.cfg.img_size
        ph, pw = net.cfg.patch_size
        shape = (3, net.cfg.in_chans, H + ph, W + 2 * pw) if dynamic else tuple(x.shape)
        xc = torch.randn(shape)
        with torch.inference_mode():
            diff = (torch.export.load(str(path)).module()(xc) - net(xc)).abs().max().item()
        result = ExportResult(path, "pt2", dynamic, None, shape, diff)
    return result


__all__ = [
    "export_onnx",
    "export_pt2",
    "ExportResult",
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "METADATA_KEYS",
]
