"""Prediction: a checkpoint and images in, its task's predictions out (a classifier: top-k labels with softmax
probabilities; a multi-label model: every label above its threshold).

Per image: `decode_image` (any format; bombs, truncation and non-images refused with a reason) ->
`preprocess_image` with the checkpoint's own PreprocessConfig -> stacked into a batch -> a backend's
`run(batch) -> logits` -> the task's prediction format (`vitkit.tasks`: softmax -> top-k for a classifier).

Backends are pluggable: a backend factory takes the loaded VisionTransformer (and the checkpoint path) and
returns a callable `run(batch (B, C, H, W) float32) -> logits (B, classes) float32`. "torch" is built in (bf16
autocast under inference_mode, several times faster than fp32 on AMX CPUs; on the CPU it engages the model's
inference fast path of vitkit/fast/: prepacked weights, fused GELU, a bf16 residual stream;
ViT-S/16 @224 about 1.8x timm at batch 32, `benchmarks/throughput.py`); other engines register theirs with
`register_backend("onnxruntime", factory)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PreprocessConfig, to_2tuple
from ..data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from ..data.preprocess import preprocess_image, resize_and_crop
from ..fast import packing
from ..model import VisionTransformer
from ..tasks import task_of
from ..tasks.classify import Prediction, top_k_predictions
from .onnx_backend import is_onnx_file, model_from_onnx, onnxruntime_backend
from .precision import effective_precision, model_for

Backend = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) float32 -> (B, classes) float32 logits
BackendFactory = Callable[..., Backend]  # factory(model, checkpoint=Path | None, **options) -> Backend
ImageInput = str | Path | bytes | np.ndarray  # a file, its bytes, or an (H, W, 3) uint8 array

_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `Predictor(..., backend=name)` available; `factory(model, checkpoint=..., **options) -> run`."""
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def torch_backend(
    model: VisionTransformer, checkpoint: Path | None = None, precision: str = "bf16", compile: bool = False
) -> Backend:
    """Run the model itself: bf16 autocast (precision="bf16"), plain fp32, or int8 block linears with the rest under
    bf16 autocast (precision="int8", or any model `vitkit quantize` wrote: vitkit/infer/precision.py), always under
    inference_mode.

    eval mode + inference_mode + bf16 autocast on the CPU is exactly what engages the model's fast path
    (`vitkit.fast`); fp32 runs the ordinary, exact ops.

    compile=True (the "torch-compile" backend): through torch.compile with inductor's freezing (weights folded into
    the graph as constants). Opt-in, for long-running serving at small batches: the first call of a batch shape
    compiles (~10-13 s for ViT-S/16 on a 2-core CPU; a second shape compiles once more with a dynamic batch).
    `benchmarks/inference_fast_path.py --compiled` measures it against the eager fast path: faster at batch 1,
    no gain at batch 32. The weights must not change afterwards (they are frozen into the graph).
    """
    if compile and effective_precision(model, precision) == "int8":
        raise ValueError("int8 models run eagerly (their plans call oneDNN directly); use --backend torch")
    model, bf16 = model_for(model, precision)
    model.eval()
    device = next(model.parameters()).device
    forward = model
    frozen = contextlib.nullcontext
    if compile:
        from torch._inductor import config as inductor_config

        forward = torch.compile(model)
        # freezing must be on while a shape compiles (lazily, inside a call): torch.compile(options={"freezing":
        # True}) does not reach those compiles, so inductor's config is patched around every call instead
        frozen = functools.partial(inductor_config.patch, freezing=True)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with frozen(), torch.inference_mode():
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                return forward(batch.to(device)).float()  # (B, classes)

    return run


register_backend("torch", torch_backend)
register_backend("torch-compile", functools.partial(torch_backend, compile=True))
register_backend("onnxruntime", onnxruntime_backend)  # vitkit/infer/onnx_backend.py; needs the onnx extra


@dataclass
class Failure:
    """An image that could not be predicted, and why (the message names the image)."""

    image: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "error": self.error}


class Predictor:
    """One model in memory, its preprocessing, and a backend; predicts single images or batches.

    Args:
        model: a checkpoint path (any format `vitkit.from_pretrained` reads) or a VisionTransformer.
        backend: name of a registered backend ("torch"; see `available_backends()`).
        input_size: (H, W) to feed instead of the checkpoint's size; only for models built with
            dynamic_img_size=True (or the same size).
        max_pixels: images with more pixels are refused before decoding (decompression bombs).
        threshold: a multi-label model's probability threshold instead of the one its checkpoint records.
        **backend_options: passed to the backend factory (torch: precision="bf16" | "fp32" | "int8").
    """

    def __init__(
        self,
        model: str | Path | VisionTransformer,
        backend: str = "torch",
        input_size: int | tuple[int, int] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threshold: float | None = None,
        **backend_options: Any,
    ):
        from ..interop import from_pretrained

        self.checkpoint = None if isinstance(model, VisionTransformer) else Path(model)
        if is_onnx_file(self.checkpoint) and backend != "onnxruntime":
            raise ValueError(f"'{model}' is an exported ONNX graph; predict it with --backend onnxruntime")
        load = model_from_onnx if is_onnx_file(self.checkpoint) else from_pretrained  # .onnx: weightless shell
        self.model = (model if isinstance(model, VisionTransformer) else load(model)).eval()
        cfg = self.model.cfg
        pre = self.model.preprocess
        if input_size is not None:
            size = to_2tuple(input_size)
            if size != tuple(cfg.img_size) and not cfg.dynamic_img_size:
                raise ValueError(
                    f"this model was built for {cfg.img_size[0]}x{cfg.img_size[1]} inputs and not with "
                    f"dynamic_img_size=True; leave --input-size out or use {cfg.img_size[0]} {cfg.img_size[1]}"
                )
            pre = dataclasses.replace(pre, input_size=size)
        self.preprocess: PreprocessConfig = pre
        self.labels = list(self.model.labels or [str(i) for i in range(cfg.num_classes)])
        self.task = task_of(self.model)  # what the checkpoint was trained for: how its outputs read
        if threshold is not None:
            if not hasattr(self.task, "threshold"):
                raise ValueError(f"a threshold applies to multi-label models; this is a '{self.task.name}' model")
            self.task = dataclasses.replace(self.task, threshold=threshold)
        self.max_pixels = max_pixels
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(available_backends())}")
        self.backend_name = backend
        self.run: Backend = _BACKENDS[backend](self.model, checkpoint=self.checkpoint, **backend_options)

    # --------------------------------------------------------------------------------------- the pipeline
    def decode(self, image: ImageInput, name: str | None = None) -> np.ndarray:
        """Any accepted input -> (H, W, 3) uint8; raises ImageDecodeError naming the image and the reason."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ImageDecodeError(f"image '{name or '<array>'}' must be an (H, W, 3) uint8 array")
            return image
        return decode_image(image, name=name, max_pixels=self.max_pixels)

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> model input (C, h, w) float32, with the checkpoint's preprocessing."""
        return preprocess_image(trim_extreme_aspect(rgb, self.preprocess), self.preprocess, self.model.cfg.in_chans)

    def crop(self, rgb: np.ndarray) -> np.ndarray:
        """The picture the model sees, before normalisation: (h, w, 3) uint8 at the preprocessed crop."""
        rgb = trim_extreme_aspect(rgb, self.preprocess)
        t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, H, W)
        crop = resize_and_crop(t, self.preprocess).permute(1, 2, 0).numpy()  # (h, w, 3)
        if self.model.cfg.in_chans == 1:  # a grayscale model sees luminance: show that
            gray = crop.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            crop = np.repeat((gray + 0.5).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
        return crop

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32 -> (B, classes) float32 through the backend."""
        return self.run(batch)

    def top_k(self, logits: torch.Tensor, names: Sequence[str], k: int = 5) -> list[Prediction]:
        """(B, classes) logits -> one Prediction per row: the k most probable classes with softmax probabilities.
        A headless encoder (num_classes 0, as `vitkit pretrain` saves) has no classes: its Predictions are empty."""
        if not self.model.cfg.num_classes:
            return [Prediction(name, [], [], []) for name in names]
        return top_k_predictions(logits, names, self.labels, k)

    def format(self, logits: torch.Tensor, names: Sequence[str], topk: int = 5) -> list:
        """(B, classes) outputs -> one prediction per row in the task's format (top-k; labels above a threshold)."""
        if not self.model.cfg.num_classes:
            raise ValueError(
                "this model has no head (num_classes 0: an encoder, e.g. from `vitkit pretrain`), so it predicts "
                "nothing; `vitkit embed` gives its features, `vitkit explain` its attention, `vitkit finetune --from` "
                "gives it a head"
            )
        return self.task.predictions(logits, names, self.labels, topk)

    def predict(
        self,
        images: Sequence[ImageInput],
        topk: int = 5,
        batch_size: int = 32,
        names: Sequence[str] | None = None,
        errors: str = "raise",
    ) -> list[Prediction | Any]:
        """Predict many images in batches, each in the task's format (a classifier: Prediction; a multi-label
        model: vitkit.tasks.multilabel.LabelSet).

        errors="raise": the first bad image raises ImageDecodeError. errors="collect": a bad image becomes a
        Failure in its place and the others are still predicted.
        """
        if errors not in ("raise", "collect"):
            raise ValueError("errors must be 'raise' or 'collect'")
        names = list(names) if names is not None else [_name_of(im, i) for i, im in enumerate(images)]
        results: list[Any] = [None] * len(images)
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                batch = torch.stack([x for _, x in pending])  # (B, C, h, w)
                preds = self.format(self.logits(batch), [names[i] for i, _ in pending], topk)
                for (i, _), pred in zip(pending, preds):
                    results[i] = pred
                pending.clear()

        for i, image in enumerate(images):
            try:
                pending.append((i, self.prepare(self.decode(image, names[i]))))
            except ImageDecodeError as e:
                if errors == "raise":
                    raise
                results[i] = Failure(names[i], str(e))
            if len(pending) >= batch_size:
                flush()
        flush()
        return results  # type: ignore[return-value]

    def predict_one(self, image: ImageInput, topk: int = 5, name: str | None = None) -> Prediction:
        """One image -> its Prediction (raises ImageDecodeError for a bad image)."""
        return self.predict([image], topk=topk, names=[name or _name_of(image, 0)])[0]  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """What is loaded, for logs and /healthz."""
        cfg = self.model.cfg
        return {
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "backend": self.backend_name,
            "task": self.task.spec(),
            "num_classes": cfg.num_classes,
            "input_size": list(self.preprocess.input_size),
            "patch_size": list(cfg.patch_size),
            "depth": cfg.depth,
            "num_heads": cfg.num_heads,
            "global_pool": cfg.global_pool,
            "class_token": cfg.class_token,
            "reg_tokens": cfg.reg_tokens,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "cpu_fast_path": packing.available(),  # prepacked bf16 kernels (vitkit/fast)
        }


def trim_extreme_aspect(rgb: np.ndarray, pre: PreprocessConfig, max_ratio: float = 64.0) -> np.ndarray:
    """Cut a very long image (say 1 x 100,000 px) to the centre band the crop will use anyway: (H, W, 3).

    For a square input size the shorter side is resized to size / crop_pct and the centre cropped, so a
    1 x 100,000 image would first be blown up to 224 x 22,400,000 pixels. Only the central `short * crop_pct`
    pixels of the long side reach the model; keeping them plus a margin for the resize filter gives the same
    crop without the blow-up. Shapes up to `max_ratio` pass through untouched (their resize costs
    at most max_ratio crops' worth of pixels); beyond it the result matches up to resampling round-off.
    """
    h, w = rgb.shape[:2]
    short, long = min(h, w), max(h, w)
    if pre.input_size[0] != pre.input_size[1] or long <= max_ratio * short:
        return rgb
    scale = pre.input_size[0] / pre.crop_pct / short  # resize factor the preprocessing will apply
    keep = min(long, math.ceil(short * pre.crop_pct) + 2 * (math.ceil(4 / scale) + 2))  # + filter support
    keep += (long - keep) % 2  # trim both ends equally so the centre stays exactly where it was
    start = (long - keep) // 2
    return rgb[start : start + keep] if h > w else rgb[:, start : start + keep]


def _name_of(image: ImageInput, index: int) -> str:
    return str(image) if isinstance(image, str | Path) else f"<image {index}>"


__all__ = [
    "Predictor",
    "Prediction",
    "Failure",
    "Backend",
    "register_backend",
    "available_backends",
    "torch_backend",
]
