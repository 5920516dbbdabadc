"""Training checkpoints (`last.ckpt`): everything a run needs to continue bit-identically.

Contents: model, optimizer, schedule, EMA, the RNG states (torch, numpy, python; one set per rank), the data-order
position of every rank, the step / epoch counters and the run's config. Written atomically (temp file, fsync,
rename) so a crash or a full disk never leaves a half-written file in place of the last good one. The file holds
only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PreprocessConfig, ViTConfig
from ..files import atomic_write_bytes
from ..model.serialization import CheckpointError, apply_task
from ..model.vit import VisionTransformer

CKPT_FORMAT = "vitkit-train"
CKPT_VERSION = 1
LAST = "last.ckpt"


# ----------------------------------------------------------------------------------------------- RNG state
def host_rng_state() -> dict[str, Any]:
    """numpy's and Python's global RNG states as tensors / plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_host_rng_state(state: dict[str, Any]) -> None:
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ------------------------------------------------------------------------------------------- save / load
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Serialise `state` (see `training_state` in fit.py) and write it atomically to `path`.

    Raises:
        OSError: the disk refused the write (full, read-only, ...); the previous file at `path` is untouched.
    """
    buf = io.BytesIO()
    torch.save({"format": CKPT_FORMAT, "version": CKPT_VERSION, **state}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint, with a clear CheckpointError for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickle with forbidden globals...
        raise CheckpointError(
            f"'{path}' is not a readable vitkit training checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "delete it (or pick another --out) to start the run afresh"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"'{path}' is not a vitkit training checkpoint (no '{CKPT_FORMAT}' marker)")
    missing = [k for k in ("model", "optimizer", "schedule", "step", "epoch", "config", "model_meta") if k not in state]
    if missing:
        raise CheckpointError(f"'{path}' is incomplete: it lacks {missing}; delete it to start afresh")
    return state


def model_meta(model: VisionTransformer) -> dict[str, Any]:
    """What rebuilding the model needs besides the weights: config, preprocessing, labels, and its task (whose head
    may not be the linear one: a segmentation decoder is rebuilt from it before its weights load)."""
    meta = {"config": model.cfg.to_dict(), "preprocess": model.preprocess.to_dict(), "labels": model.labels}
    return {**meta, "task": getattr(model, "task", None)}


def model_from_checkpoint(path: str | Path, use_ema: bool | None = None) -> VisionTransformer:
    """The model in a training checkpoint, ready for evaluation.

    use_ema: True = the EMA weights, False = the raw weights, None = whichever the run judged better
    (`best_weights` in the checkpoint; raw when unknown).
    """
    state = load_checkpoint(path)
    meta = state["model_meta"]
    model = VisionTransformer(
        ViTConfig.from_dict(meta["config"]), PreprocessConfig.from_dict(meta["preprocess"]), meta["labels"]
    )
    apply_task(model, meta.get("task"))  # a checkpoint written before tasks existed has none: a classifier
    if use_ema is None:
        use_ema = state.get("best_weights") == "ema"
    if use_ema and state.get("ema") is None:
        raise CheckpointError(f"'{path}' has no EMA weights (the run had --ema-decay 0)")
    model.load_state_dict(state["ema"] if use_ema else state["model"])
    return model.eval()
