"""vitkit's own checkpoint format: safetensors whose metadata carries config, preprocessing and labels.

A `.safetensors` written here is enough on its own to rebuild the model and to predict correctly.
The write is atomic (vitkit.files), so a crash never leaves a half-written checkpoint. This module knows the file
format only, not the model class: `save_model` takes anything with state_dict/cfg/preprocess/labels, and rebuilding
a VisionTransformer from a file (`load_model`) lives in vitkit.model.loading, so vit.py may use this module freely.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from safetensors import safe_open
from safetensors.torch import save as st_save

from ..config import PreprocessConfig, ViTConfig
from ..files import atomic_write_bytes

FORMAT = "vitkit"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model."""


class ExportError(ValueError):
    """The target format cannot express this model (e.g. a conv stem for transformers' ViT)."""


class SavableModel(Protocol):
    """What the format needs of a model (a VisionTransformer has it): its weights and what rebuilding it takes."""

    cfg: ViTConfig
    preprocess: PreprocessConfig
    labels: list[str] | None

    def state_dict(self) -> dict[str, Any]: ...


def build_metadata(model: SavableModel, **extra: str) -> dict[str, str]:
    """The safetensors metadata for `model`: format marker, config, preprocessing, labels, then `extra`."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_json(),
        "preprocess": json.dumps(model.preprocess.to_dict()),
    }
    if model.labels is not None:
        meta["labels"] = json.dumps(list(model.labels))
    task = getattr(model, "task", None)  # set by vitkit.tasks; a model without one is a plain classifier
    if task:
        meta["task"] = json.dumps(task)
    quantization = getattr(model, "quantization", None)  # set by vitkit.quant on an int8 model
    if quantization:
        meta["quantization"] = json.dumps(quantization)
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_model(model: SavableModel, path: str | Path, **extra: str) -> Path:
    """Save a model's weights (contiguous, CPU) with its metadata, atomically; returns `path` as a Path."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, st_save(tensors, metadata=build_metadata(model, **extra)))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata ({} when none), with a clear error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {e}") from e


def is_vitkit_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    try:
        return read_metadata(p).get("format") == FORMAT
    except CheckpointError:
        return False


# Limits on what a checkpoint's metadata may ask us to build: a file must not be able to make us allocate more
# than it holds (its tensors are checked against the config before the model gets real memory).
MAX_DEPTH = 1024
MAX_BUFFER_ELEMENTS = 2**28  # non-persistent buffers (sincos position table): 1 GiB of float32
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _config_problems(raw: dict[str, Any]) -> list[str]:
    """What is wrong with a config dict read from a file: types and ranges, checked before ViTConfig sees it."""
    v = {f.name: f.default for f in dataclasses.fields(ViTConfig)} | raw
    problems = []
    ints = {"in_chans": 1, "num_classes": 0, "embed_dim": 1, "depth": 0, "num_heads": 1, "reg_tokens": 0}
    for key, low in ints.items():
        if not _is_int(v[key]) or v[key] < low:
            problems.append(f"{key}={v[key]!r} (expected an integer >= {low})")
    if _is_int(v["depth"]) and v["depth"] > MAX_DEPTH:
        problems.append(f"depth={v['depth']} (more than {MAX_DEPTH} blocks)")
    for key in ("img_size", "patch_size"):
        pair = v[key] if isinstance(v[key], (list, tuple)) else [v[key]]
        if not 1 <= len(pair) <= 2 or not all(_is_int(x) and x >= 1 for x in pair):
            problems.append(f"{key}={v[key]!r} (expected a positive integer or a pair of them)")
    for key in ("qkv_bias", "qk_norm", "class_token", "no_embed_class", "pre_norm", "dynamic_img_size"):
        if not isinstance(v[key], bool):
            problems.append(f"{key}={v[key]!r} (expected true or false)")
    if v["fc_norm"] is not None and not isinstance(v["fc_norm"], bool):
        problems.append(f"fc_norm={v['fc_norm']!r} (expected true, false or null)")
    for key in ("mlp_ratio", "norm_eps"):
        if not _is_real(v[key]) or v[key] <= 0:
            problems.append(f"{key}={v[key]!r} (expected a positive number)")
    if v["init_values"] is not None and not _is_real(v["init_values"]):
        problems.append(f"init_values={v['init_values']!r} (expected a number or null)")
    for key in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
        if not _is_real(v[key]) or not 0 <= v[key] < 1:
            problems.append(f"{key}={v[key]!r} (expected a number in [0, 1))")
    for key in ("global_pool", "pos_embed", "stem", "attn_backend"):
        if not isinstance(v[key], str):
            problems.append(f"{key}={v[key]!r} (expected a string)")
    return problems


def _preprocess_problems(pre: PreprocessConfig, in_chans: int) -> list[str]:
    problems = []
    if not all(_is_int(x) and x >= 1 for x in pre.input_size):
        problems.append(f"input_size={pre.input_size!r} (expected positive integers)")
    for key in ("mean", "std"):  # one per channel, or RGB statistics that normalize() averages for other counts
        v = getattr(pre, key)
        if len(v) not in {1, 3, in_chans} or not all(math.isfinite(x) for x in v):
            problems.append(f"{key}={v!r} (expected {in_chans} finite numbers, one per input channel)")
    if len(pre.mean) != len(pre.std):
        problems.append(f"mean has {len(pre.mean)} values but std {len(pre.std)}")
    if any(x <= 0 for x in pre.std):
        problems.append(f"std={pre.std!r} (expected positive numbers)")
    if pre.interpolation not in INTERPOLATIONS:
        problems.append(f"interpolation={pre.interpolation!r} (expected one of {INTERPOLATIONS})")
    if not _is_real(pre.crop_pct) or not 0 < pre.crop_pct <= 4:
        problems.append(f"crop_pct={pre.crop_pct!r} (expected a number in (0, 4])")
    return problems


def _json_object(meta: dict[str, str], key: str, path: str | Path) -> Any:
    value = meta[key]
    if not isinstance(value, str):
        raise CheckpointError(f"'{path}': metadata '{key}' is a {type(value).__name__}, expected a JSON string")
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"'{path}': metadata '{key}' is not valid JSON ({e})") from None


def parse_metadata(
    meta: dict[str, str], path: str | Path = "<memory>"
) -> tuple[ViTConfig, PreprocessConfig, list | None]:
    """Config, preprocessing and labels from vitkit metadata; every defect is a CheckpointError naming the file."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"'{path}' is not a vitkit checkpoint (metadata format={found!r}); foreign checkpoints load through "
            "vitkit.from_pretrained"
        )
    if "config" not in meta:
        raise CheckpointError(f"'{path}': metadata lacks 'config'; the file is damaged or was not written by vitkit")
    raw_cfg = _json_object(meta, "config", path)
    raw_pre = _json_object(meta, "preprocess", path) if "preprocess" in meta else {}
    labels = _json_object(meta, "labels", path) if "labels" in meta else None
    for key, value in (("config", raw_cfg), ("preprocess", raw_pre)):
        if not isinstance(value, dict):
            raise CheckpointError(f"'{path}': metadata '{key}' is a JSON {type(value).__name__}, expected an object")
    problems = _config_problems(raw_cfg)
    if problems:
        raise CheckpointError(f"'{path}': malformed config in metadata: {'; '.join(problems)}")
    try:
        cfg = ViTConfig.from_dict(raw_cfg)
    except Exception as e:  # ViTConfig's own checks (unknown keys, divisibility, choices)
        raise CheckpointError(f"'{path}': malformed config in metadata: {e}") from None
    try:
        pre = PreprocessConfig.from_dict(raw_pre)
    except Exception as e:
        raise CheckpointError(f"'{path}': malformed preprocess in metadata: {e}") from None
    problems = _preprocess_problems(pre, cfg.in_chans)
    if problems:
        raise CheckpointError(f"'{path}': malformed preprocess in metadata: {'; '.join(problems)}")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels):
            raise CheckpointError(f"'{path}': metadata 'labels' must be a JSON list of class names")
        if len(labels) != cfg.num_classes:
            raise CheckpointError(f"'{path}': {len(labels)} labels do not match num_classes={cfg.num_classes}")
        labels = [str(x) for x in labels]
    return cfg, pre, labels


# ---------------------------------------------------------------------------------------------- folders
# `VisionTransformer.save_pretrained(DIR, format=...)` looks its writer up here. The model package cannot import
# vitkit.interop (imports flow interop -> model), so the foreign formats register themselves when vitkit.interop
# is imported (`import vitkit` does it). A writer takes (model, directory, **options) and returns the directory.
FolderWriter = Callable[..., Path]
FOLDER_WRITERS: dict[str, FolderWriter] = {}
WEIGHTS_FILE = "model.safetensors"  # the Hub's name for the weights, whatever the format


def register_folder_writer(name: str, writer: FolderWriter) -> None:
    """Make `save_pretrained(DIR, format=name)` call `writer`; a later registration replaces an earlier one."""
    FOLDER_WRITERS[name] = writer


def save_folder(model: SavableModel, directory: str | Path, format: str = FORMAT, **options: Any) -> Path:
    """Write `model` as a folder in `format` through the registered writer; unknown formats name the known ones."""
    writer = FOLDER_WRITERS.get(format)
    if writer is None:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(sorted(FOLDER_WRITERS))}")
    return writer(model, Path(directory), **options)


def write_vitkit_folder(model: SavableModel, directory: Path, **extra: str) -> Path:
    """DIR/model.safetensors: vitkit's own file, complete on its own (config, preprocessing, labels inside)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory / WEIGHTS_FILE, **extra)
    return directory


register_folder_writer(FORMAT, write_vitkit_folder)


# ------------------------------------------------------------------------------------------------ tasks
# What a model was trained for travels in the metadata as `task`, a JSON object such as {"name": "multilabel",
# "threshold": 0.5}; a file without one is a single-label classifier. The model keeps it as `model.task`. A task
# whose head is not the model's own linear `head` (a segmentation decoder) registers a builder that rebuilds that
# head from the recorded object before the weights load. The model package cannot import vitkit.tasks (imports flow
# tasks -> model), so vitkit.tasks registers its builders when it is imported, as vitkit.interop registers its
# folder writers.
TaskHeadBuilder = Callable[[Any, dict[str, Any]], None]  # (model, task object) -> None: replaces model.head
TASK_HEADS: dict[str, TaskHeadBuilder] = {}


def register_task_head(name: str, builder: TaskHeadBuilder) -> None:
    """Make loading a file whose task is `name` call `builder(model, task)` before its weights load."""
    TASK_HEADS[name] = builder


def parse_task(meta: dict[str, str], path: str | Path = "<memory>") -> dict[str, Any] | None:
    """The `task` object of vitkit metadata (None: a classifier), checked for shape; a defect names the file."""
    if "task" not in meta:
        return None
    task = _json_object(meta, "task", path)
    if not isinstance(task, dict) or not isinstance(task.get("name"), str) or not task["name"]:
        raise CheckpointError(f"'{path}': metadata 'task' must be a JSON object with a 'name', got {task!r}")
    return task


def apply_task(model: Any, task: dict[str, Any] | None) -> None:
    """Record `task` as `model.task` and, when the task registered a head builder, rebuild the head for it."""
    model.task = task
    if task is not None and task["name"] in TASK_HEADS:
        TASK_HEADS[task["name"]](model, task)


def unbuilt_head_hint(task: dict[str, Any] | None) -> str:
    """What to say when a file's tensors miss the model: its task's head may not have been registered."""
    if task is None or task["name"] in TASK_HEADS:
        return ""
    return f" (the file is a '{task['name']}' model: if its head is built by vitkit.tasks, import vitkit.tasks first)"


# ---------------------------------------------------------------------------------------------- quantization
# An int8 model (vitkit.quant) records how it was quantized as `quantization`, a JSON object such as {"scheme":
# "int8", "activations": "static", ...}; its block linears hold int8 weights and scales where a float model holds
# float weights. Loading such a file rebuilds those layers before the weights load, through the builder that
# vitkit.quant registers when it is imported (`import vitkit` imports it), as vitkit.tasks registers task heads.
QuantizedBuilder = Callable[[Any, dict[str, Any]], None]  # (model, quantization record) -> None: int8 layers in place
QUANTIZED_STRUCTURES: dict[str, QuantizedBuilder] = {}


def register_quantized_structure(scheme: str, builder: QuantizedBuilder) -> None:
    """Make loading a file quantized with `scheme` call `builder(model, record)` before its weights load."""
    QUANTIZED_STRUCTURES[scheme] = builder


def parse_quantization(meta: dict[str, str], path: str | Path = "<memory>") -> dict[str, Any] | None:
    """The `quantization` record of vitkit metadata (None: a float model), checked for shape."""
    if "quantization" not in meta:
        return None
    record = _json_object(meta, "quantization", path)
    if not isinstance(record, dict) or not isinstance(record.get("scheme"), str):
        raise CheckpointError(f"'{path}': metadata 'quantization' must be a JSON object with a 'scheme'")
    return record


def apply_quantization(model: Any, record: dict[str, Any] | None, path: str | Path = "<memory>") -> None:
    """Give `model` the quantized layers `record` describes (nothing for a float model); errors name the file."""
    if record is None:
        return
    builder = QUANTIZED_STRUCTURES.get(record["scheme"])
    if builder is None:
        known = ", ".join(sorted(QUANTIZED_STRUCTURES)) or "none"
        raise CheckpointError(
            f"'{path}' holds a model quantized as {record['scheme']!r}, which this vitkit cannot load (known: {known})"
        )
    try:
        builder(model, record)
    except (CheckpointError, ImportError) as e:  # a malformed record; kernels this PyTorch lacks
        raise type(e)(f"'{path}': {e}") from None
