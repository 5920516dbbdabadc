"""Loading weights from anywhere: vitkit's own safetensors and (one module each) foreign formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ViTConfig
from ..model import VisionTransformer, load_model
from ..model import create_model as _create_random_model
from ..model.serialization import WEIGHTS_FILE, CheckpointError, apply_task, read_metadata
from . import folders  # noqa: F401  (registers save_pretrained's formats: vitkit, hf, timm)
from .report import LoadReport


def from_pretrained(
    source: str | Path,
    strict: bool = True,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """Load a model from a checkpoint file or folder, or by name from the Hugging Face Hub, detecting its format.

    Names: a transformers ViT repo (`google/vit-base-patch16-224`), a timm repo (`hf-hub:timm/NAME` or
    `timm/NAME`), a timm model name with its pretrained tag (`vit_small_patch16_224.augreg_in21k_ft_in1k`, i.e.
    the repo `timm/` + that name; a bare timm name takes timm's default tag when timm is installed), `OWNER/NAME@REV`,
    `local-dir:PATH`, or a path (an existing path always wins). Downloads land in huggingface_hub's cache; see
    `vitkit.interop.hub` for what is fetched and how failures and offline use behave.
    Formats: vitkit `.safetensors`; timm state dicts (`.pth`/`.bin`/`.safetensors`) and timm Hub folders;
    transformers ViT folders; torchvision ViT state dicts; JAX `.npz` (google-research and big_vision).
    The architecture is inferred from the tensors' shapes. Every load builds a coverage report (logged, and
    kept as `model.load_report`, with the repo and commit for a name); with `strict=True` any unmatched or
    missing tensor is an error naming it.

    Args:
        source: a path or a name, as above.
        strict: fail on any tensor that does not fit (False: load what fits, report the rest).
        revision: for a name: a branch, tag or commit hash (default: the repo's main branch).
        cache_dir: for a name: the Hub cache folder (default: huggingface_hub's, HF_HUB_CACHE / HF_HOME).
        token: for a name: a Hub token for private or gated repos (default: HF_TOKEN or the stored login).
        local_files_only: for a name: read the cache only, never the network (HF_HUB_OFFLINE=1 does the same).
        **overrides: timm names, and they win: `num_classes` replaces the head, `img_size` resamples the
            position embedding, `in_chans` adapts the RGB patch embedding (1: summed, k: repeated and rescaled),
            others (`global_pool`, `num_heads`, `drop_path_rate`, ...) change the config.
    """
    hub = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    return load_with_report(source, strict=strict, **hub, **overrides)[0]


def load_with_report(
    source: str | Path,
    strict: bool = True,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **overrides: Any,
) -> tuple[VisionTransformer, LoadReport]:
    """Like from_pretrained, but also returns the coverage report."""
    from .common import build_model
    from .detect import detect_format, load_foreign
    from .hub import locate

    hub = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    path, origin = locate(source, **hub)
    if _reading(detect_format, path) == "vitkit":
        path = path / WEIGHTS_FILE if path.is_dir() else path  # a save_pretrained folder holds one vitkit file
        _register_task_heads(path)
        model = load_model(path)
        report = LoadReport(str(path), "vitkit", origin=origin)
        report.mapped = [(k, k) for k in model.state_dict()]
        report.log()
        model = apply_overrides(model, **overrides)
    else:
        conv = _reading(lambda p: load_foreign(p, img_size=overrides.get("img_size")), path)
        report = conv.report
        report.origin = origin  # before build_model logs the report
        # what needs the loaded weights (resampled positions, a new head, adapted channels) comes after the build
        size_and_head = {k: overrides.pop(k) for k in ("img_size", "num_classes", "in_chans") if k in overrides}
        model = build_model(conv, overrides, strict, size_hint=size_and_head.get("img_size"))
        model = apply_overrides(model, **size_and_head)
    model.load_report = report
    return model, report


def create_model(
    name: str | ViTConfig = "vit_base_patch16_224",
    pretrained: bool = False,
    *,
    strict: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """timm's `create_model`: a ViT with random weights, or with `pretrained=True` the weights its name points to.

    `create_model("vit_small_patch16_224", num_classes=10)` builds random weights (vitkit.model.create_model);
    `create_model("vit_base_patch16_224.augreg_in21k", pretrained=True, num_classes=10)` loads timm's weights of
    that tag (any name or path from_pretrained takes; a bare timm name takes timm's default tag when timm is
    installed) and applies the overrides as from_pretrained does. The keyword arguments are from_pretrained's.
    """
    if not pretrained:
        return _create_random_model(name, **overrides)
    if isinstance(name, ViTConfig):
        raise ValueError("pretrained=True needs a name or a path to load weights from, not a ViTConfig")
    hub = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    return from_pretrained(name, strict=strict, **hub, **overrides)


def _register_task_heads(path: Path) -> None:
    """Import vitkit.tasks when the file records a task: a task with its own head (a segmentation decoder)
    registers the builder that loading needs. Plain classifiers load without it (it brings the data stack)."""
    try:
        has_task = "task" in read_metadata(path)
    except CheckpointError:
        return  # load_model names the problem
    if has_task:
        from .. import tasks  # noqa: F401


def _reading(read: Any, path: Path) -> Any:
    """Run a format reader; a defect it did not foresee (a config.json field of the wrong type) still gives a
    CheckpointError naming the file rather than a traceback."""
    try:
        return read(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"'{path}': malformed checkpoint or config.json ({type(e).__name__}: {e}); check the file"
        ) from e


def convert(
    source: str | Path, dest: str | Path, strict: bool = True, to: str = "vitkit", **overrides: Any
) -> LoadReport:
    """Load any supported checkpoint and write it as a vitkit safetensors file (config, preprocessing, labels).

    to: "vitkit" writes that one file, or a save_pretrained folder when `dest` does not end in .safetensors;
    "hf" / "timm" write the folder transformers / timm load. Folders get a model card (README.md) with the
    source's metadata and, when it sits in a run folder, the run's metrics.
    """
    model, report = load_with_report(source, strict=strict, **overrides)
    origin = f"{report.origin.repo_id}@{report.origin.commit}" if report.origin else str(source)
    provenance = {"converted_from": origin, "source_format": report.format}
    if to == "vitkit" and Path(dest).suffix == ".safetensors":
        model.save(dest, **provenance)
    else:
        model.save_pretrained(dest, format=to, source=None if report.origin else source, **provenance)
    return report


def apply_overrides(model: VisionTransformer, **overrides: Any) -> VisionTransformer:
    """Adapt a loaded model: a new class count replaces the head, a new image size resamples positions, a new
    channel count adapts the first conv (vitkit.interop.adapt: summed for one channel, repeated and rescaled for more).
    """
    from ..model.pos_embed import resample_pos_embed
    from .adapt import adapt_in_chans

    num_classes = overrides.pop("num_classes", None)
    global_pool = overrides.pop("global_pool", None)
    img_size = overrides.pop("img_size", None)
    in_chans = overrides.pop("in_chans", None)
    if in_chans is not None:
        model = adapt_in_chans(model, in_chans)
    if img_size is not None:
        cfg = model.cfg.replace(img_size=img_size)
        if cfg.img_size != model.cfg.img_size:
            state = model.state_dict()
            if model.cfg.pos_embed == "learn":
                prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
                state["pos_embed"] = resample_pos_embed(state["pos_embed"], cfg.grid_size, model.cfg.grid_size, prefix)
            pre = model.preprocess
            pre.input_size = cfg.img_size
            new = VisionTransformer(cfg, preprocess=pre, labels=model.labels)
            apply_task(new, getattr(model, "task", None))  # a task's own head (a segmentation decoder) too
            new.load_state_dict(state)
            model = new
    if overrides:
        # options that do not change any tensor shape (dropout, drop path, backend, dynamic size)
        cfg = model.cfg.replace(**overrides)
        new = VisionTransformer(cfg, preprocess=model.preprocess, labels=model.labels)
        apply_task(new, getattr(model, "task", None))
        new.load_state_dict(model.state_dict())
        model = new
    if (num_classes is not None and num_classes != model.cfg.num_classes) or global_pool is not None:
        model.reset_classifier(model.cfg.num_classes if num_classes is None else num_classes, global_pool)
    return model


__all__ = ["from_pretrained", "create_model", "load_with_report", "convert", "apply_overrides", "LoadReport"]
