"""What every foreign format shares: safe file reading, config inference from tensor shapes, build + load.

Each format module turns its file into a `Converted`: a state dict already in vitkit's (= timm's) names, a
report of where each source tensor went, and the hints its format stores (head count, LayerNorm eps,
preprocessing, labels). `build_model` then infers the rest of the config from the shapes, builds the model,
fills it and completes the report.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import HEADS_BY_WIDTH, PreprocessConfig, ViTConfig, field_names, to_2tuple
from ..model import VisionTransformer
from ..model.serialization import CheckpointError
from .report import LoadReport


@dataclass
class Converted:
    """A foreign checkpoint translated to vitkit names, plus what its format says beyond the tensors."""

    state: dict[str, torch.Tensor]
    report: LoadReport
    hints: dict[str, Any] = field(default_factory=dict)  # ViTConfig fields the format stores
    preprocess: PreprocessConfig | None = None
    labels: list[str] | None = None


# ------------------------------------------------------------------------------------------- safe reading
def read_torch_file(path: Path) -> dict[str, Any]:
    """A pickle-based checkpoint through `torch.load(weights_only=True)`: tensors and plain containers only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"'{path}' was refused: it holds Python objects other than tensors and plain containers, and vitkit "
            f"never runs code from a checkpoint (torch.load weights_only=True). Re-save it as a plain state dict "
            f"or as safetensors. Detail: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # damaged files raise RuntimeError, EOFError, OSError, KeyError... (often with no text)
        detail = (str(e) or type(e).__name__).splitlines()[0]
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint: {detail}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    return obj


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {e}") from e


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz; allow_pickle=False so an object array can never run code."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"'{path}' is not a readable .npz of plain arrays: {e}") from e


def unwrap_state_dict(obj: dict[str, Any], report: LoadReport) -> dict[str, torch.Tensor]:
    """Training checkpoints nest the weights ({'model': ...}, {'state_dict': ...}) and DDP adds 'module.'."""
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj.get(key), dict):
            for k in obj:
                if k != key:
                    report.ignore(k, f"training-checkpoint entry next to '{key}'")
            report.note(f"weights taken from the checkpoint's '{key}' entry")
            obj = obj[key]
            break
    state = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            state[k] = v
        else:
            report.ignore(k, f"not a tensor ({type(v).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
        report.note("removed the 'module.' prefix (DistributedDataParallel)")
    return state


# --------------------------------------------------------------------------------------- config inference
def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def infer_config(state: dict[str, torch.Tensor], hints: dict[str, Any], source: str) -> dict[str, Any]:
    """ViTConfig fields from a vitkit-named state dict's shapes; hints fill what the shapes cannot say.

    Shapes decide width, depth, patch, channels, tokens, MLP ratio, qkv bias, qk-norm, LayerScale, fc_norm,
    attention pooling, class count and (with the prefix count) the patch grid. Hints decide the head count,
    norm eps, and the pooling when the shapes allow several.
    """
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"'{source}': no patch embedding found (patch_embed.proj.weight); is it a ViT?")
    D, C, ph, pw = state["patch_embed.proj.weight"].shape  # (D, C, p, p)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    cfg: dict[str, Any] = dict(
        embed_dim=D,
        in_chans=C,
        patch_size=(ph, pw),
        depth=max(blocks) + 1 if blocks else 0,
        class_token="cls_token" in state,
        reg_tokens=state["reg_token"].shape[1] if "reg_token" in state else 0,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state,
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,  # any value: the gammas are loaded
        pre_norm="norm_pre.weight" in state,
        fc_norm="fc_norm.weight" in state,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
    )
    if "blocks.0.mlp.fc1.weight" in state:
        cfg["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / D

    # heads: the format's own record, else qk-norm's per-head width, else the standard table
    if "num_heads" in hints:
        cfg["num_heads"] = hints["num_heads"]
    elif cfg["qk_norm"]:
        cfg["num_heads"] = D // state["blocks.0.attn.q_norm.weight"].shape[0]
    elif D in HEADS_BY_WIDTH:
        cfg["num_heads"] = HEADS_BY_WIDTH[D]
    else:
        raise CheckpointError(
            f"'{source}': the head count is not stored and width {D} is not a standard width "
            f"({sorted(HEADS_BY_WIDTH)}); pass num_heads=... (CLI: --num-heads)"
        )

    # pooling: attention pool and fc_norm are visible in the tensors; token vs avg otherwise
    if "attn_pool.latent" in state:
        cfg["global_pool"] = "map"
    elif "attn_pool.score.weight" in state:  # vitkit's sequence pooling (a bare state dict of a vitkit model)
        cfg["global_pool"] = "seqpool"
    elif "global_pool" in hints:
        cfg["global_pool"] = hints["global_pool"]
    elif cfg["fc_norm"] or not cfg["class_token"]:
        cfg["global_pool"] = "avg"
    else:
        cfg["global_pool"] = "token"

    # position embedding and grid: (1, L, D) with L = h*w (+ prefix unless no_embed_class)
    prefix = int(cfg["class_token"]) + cfg["reg_tokens"]
    hint_size = hints.get("img_size")
    if "pos_embed" in state:
        L = state["pos_embed"].shape[1]
        cfg["pos_embed"] = "learn"
        # the format's record, else the size the caller asked for when it fits L, else a square grid
        size, asked = hint_size, hints.get("fallback_img_size")
        if size is None and asked is not None:
            ah, aw = to_2tuple(asked)
            if L in ((ah // ph) * (aw // pw), (ah // ph) * (aw // pw) + prefix):
                size = (ah, aw)
        if size is None and (_is_square(L - prefix) or _is_square(L)):
            side = math.isqrt(L - prefix) if _is_square(L - prefix) else math.isqrt(L)
            size = (side * ph, side * pw)
        size = size or asked
        if size is None:
            raise CheckpointError(
                f"'{source}': cannot infer the patch grid from {L} position embeddings ({prefix} prefix tokens); "
                "pass img_size=(H, W) (CLI: --img-size H W)"
            )
        hs, ws = to_2tuple(size)
        n = (hs // ph) * (ws // pw)
        if L not in (n, n + prefix):
            raise CheckpointError(
                f"'{source}': pos_embed has {L} positions, but image size {hs}x{ws} with patch {ph}x{pw} "
                f"gives {n} patches (+{prefix} prefix tokens)"
            )
        cfg["no_embed_class"] = L == n and prefix > 0
        cfg["img_size"] = (hs, ws)
    else:
        cfg["pos_embed"] = hints.get("pos_embed", "none")
        cfg["img_size"] = hint_size or hints.get("fallback_img_size") or 224
    for k in ("norm_eps", "dynamic_img_size"):
        if k in hints:
            cfg[k] = hints[k]
    return cfg


# ------------------------------------------------------------------------------------------- build + load
def build_model(conv: Converted, overrides: dict[str, Any], strict: bool, size_hint: Any = None) -> VisionTransformer:
    """Infer the config, apply architectural overrides, build, load and complete the report.

    `img_size` and `num_classes` overrides are left to the caller (apply_overrides): they need the loaded
    weights first (position-embedding resampling, a fresh head).
    """
    report = conv.report
    arch = {k: v for k, v in overrides.items() if k not in ("img_size", "num_classes")}
    unknown = set(arch) - set(field_names())
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; known: {field_names()}")
    hints = dict(conv.hints, fallback_img_size=size_hint)  # the requested size, when the file cannot say its own
    if "num_heads" in arch:
        hints["num_heads"] = arch["num_heads"]
    if "global_pool" in arch:
        hints["global_pool"] = arch["global_pool"]
    fields = infer_config(conv.state, hints, report.source)
    fields.update(arch)
    try:
        cfg = ViTConfig(**fields)
    except (ValueError, TypeError, ZeroDivisionError) as e:  # ZeroDivisionError: num_heads=0 from a config.json
        raise CheckpointError(f"'{report.source}': the inferred config is not valid ({e}); inferred {fields}") from e

    report.note(
        f"architecture: width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, patch {cfg.patch_size}, "
        f"image {cfg.img_size}, {cfg.num_prefix_tokens} prefix tokens"
        f"{' (no position embedding for them)' if cfg.no_embed_class else ''}, pool {cfg.global_pool}, "
        f"{cfg.num_classes} classes, LayerNorm eps {cfg.norm_eps:g}"
        + (", qk-norm" if cfg.qk_norm else "")
        + (", LayerScale" if cfg.init_values else "")
    )
    pre = conv.preprocess or PreprocessConfig(input_size=cfg.img_size)
    pre.input_size = cfg.img_size
    labels = conv.labels
    if labels is not None and len(labels) != cfg.num_classes:
        report.note(f"dropped {len(labels)} labels: the head has {cfg.num_classes} classes")
        labels = None
    model = VisionTransformer(cfg, preprocess=pre, labels=labels)

    expected = model.state_dict()
    usable = {}
    for k, v in conv.state.items():
        if k not in expected:
            report.unmatched.append(f"{k} {tuple(v.shape)} (vitkit has no such tensor for this config)")
        elif v.shape != expected[k].shape:
            report.mismatched.append(f"{k}: source {tuple(v.shape)}, model {tuple(expected[k].shape)}")
        else:
            usable[k] = v.to(expected[k].dtype)
    report.missing.extend(k for k in expected if k not in conv.state)
    report.log()
    report.check(strict)
    model.load_state_dict(usable, strict=False)
    return model.eval()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """float32 tensor from any numeric array (JAX checkpoints may hold float16 or bfloat16-as-float32)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


__all__ = [
    "Converted",
    "read_torch_file",
    "read_safetensors",
    "read_npz",
    "unwrap_state_dict",
    "infer_config",
    "build_model",
]
