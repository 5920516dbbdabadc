"""Run an exported ViT in onnxruntime; the `.onnx` file alone is enough (config, preprocessing and labels travel
in its metadata_props, written by `vitkit.infer.export.export_onnx`).

    model = OnnxModel("model.onnx")
    logits = model(batch)  # (B, C, H, W) float32 -> (B, classes) float32

`onnxruntime_backend` plugs this into `Predictor(..., backend="onnxruntime")`: given an `.onnx` file it runs it;
given any other checkpoint it exports the loaded model to a temporary ONNX file first. So this module imports
vitkit.infer.export (which also defines the file's metadata keys), and export never imports this one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PreprocessConfig, ViTConfig
from ..model import VisionTransformer
from ..model.serialization import CheckpointError, apply_task, parse_task
from .export import ONNX_FORMAT, export_onnx


def _require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the onnxruntime backend needs the onnx extra: pip install 'vitkit[onnx]'") from None
    return onnxruntime


def is_onnx_file(path: str | Path | None) -> bool:
    return path is not None and Path(path).suffix.lower() == ".onnx"


class OnnxModel:
    """An onnxruntime session over a vitkit-exported ONNX file, with the model's metadata.

    Attributes: `config` (ViTConfig), `preprocess` (PreprocessConfig), `labels` (list | None), `task` (dict | None:
    the task the model was trained for, as its checkpoint recorded it), `opset` (int), `dynamic` (bool: any batch
    and image size), `metadata` (all vitkit.* entries).
    """

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        session_config: dict[str, str] | None = None,
    ):
        ort = _require_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"ONNX file '{self.path}' does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
            opts.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise CheckpointError(f"'{self.path}' could not be opened by onnxruntime: {e}") from e
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("vitkit.format") != ONNX_FORMAT:
            raise CheckpointError(
                f"'{self.path}' has no vitkit metadata (was it written by `vitkit export`?); "
                "export it with `vitkit export CKPT --format onnx`"
            )
        try:
            self.config = ViTConfig.from_dict(json.loads(self.metadata["vitkit.config"]))
            self.preprocess = PreprocessConfig.from_dict(json.loads(self.metadata["vitkit.preprocess"]))
            labels = self.metadata.get("vitkit.labels")
            self.labels: list[str] | None = json.loads(labels) if labels else None
            self.opset = int(self.metadata["vitkit.opset"])
            self.dynamic = bool(json.loads(self.metadata.get("vitkit.dynamic", "false")))
            task = {"task": self.metadata["vitkit.task"]} if "vitkit.task" in self.metadata else {}
            self.task = parse_task(task, self.path)  # how the outputs read (None: a classifier)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"'{self.path}': malformed vitkit metadata: {e}") from e
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, C, H, W) float32 -> logits (B, classes) float32."""
        x = batch.detach().cpu().float().numpy() if isinstance(batch, torch.Tensor) else batch.astype(np.float32)
        if not self.dynamic:
            want = (1, self.config.in_chans, *self.config.img_size)
            if tuple(x.shape[1:]) != want[1:]:
                raise ValueError(
                    f"'{self.path}' was exported with a fixed input {want}; got {tuple(x.shape)}. "
                    "Re-export with --dynamic for other sizes"
                )
            return torch.cat([torch.from_numpy(self._run(x[i : i + 1])) for i in range(len(x))])
        return torch.from_numpy(self._run(x))

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]

    def shell(self) -> VisionTransformer:
        """A weightless VisionTransformer (meta device) carrying config, preprocessing and labels."""
        with torch.device("meta"):
            model = VisionTransformer(self.config, preprocess=self.preprocess, labels=self.labels)
            apply_task(model, self.task)
        return model.eval()


def model_from_onnx(path: str | Path) -> VisionTransformer:
    """The model description stored in a vitkit ONNX file, as a weightless (meta-device) VisionTransformer."""
    return OnnxModel(path).shell()


def onnxruntime_backend(
    model: VisionTransformer, checkpoint: Path | None = None, threads: int | None = None, **_: Any
) -> Any:
    """Backend factory for `Predictor`: `run(batch (B, C, H, W)) -> logits (B, classes)` in onnxruntime.

    An `.onnx` checkpoint is run as is; otherwise the in-memory model is exported (dynamic sizes) to a
    temporary file first, which takes seconds for small models and about a minute for ViT-L.
    """
    if is_onnx_file(checkpoint):
        return OnnxModel(checkpoint, threads=threads)
    folder = Path(tempfile.mkdtemp(prefix="vitkit-onnx-"))
    try:
        export_onnx(model, folder / "model.onnx", dynamic=True, check=False)
        return OnnxModel(folder / "model.onnx", threads=threads)  # the session holds the graph in memory
    finally:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["OnnxModel", "model_from_onnx", "onnxruntime_backend", "is_onnx_file"]
