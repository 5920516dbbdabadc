"""Google JAX / Flax `.npz` checkpoints: google-research/vision_transformer and big_vision layouts.

google-research: `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3}`, `Transformer/posembed_input/pos_embedding` (cls included), `cls`, `embedding`, `head`.
big_vision: keys under `params/` (or `params/img/` for two-tower models, `opt/target/` in old files),
`{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`, a top-level `pos_embedding` over
the patches only, `MAPHead_0` for attention pooling, and optionally one scanned `Transformer/encoderblock`
with a leading depth axis. No stored pos_embedding in big_vision means the fixed sin-cos table.

Flax layouts: conv kernels (h, w, in, out), dense kernels (in, out), attention kernels (D, heads, head_dim)
and out kernels (heads, head_dim, D); the head count is read from the attention kernels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import INCEPTION_MEAN, INCEPTION_STD, PreprocessConfig, to_2tuple
from .common import Converted, from_numpy, read_npz
from .report import LoadReport

PREFIXES = ("opt/target/", "params/img/", "params/", "")


def find_prefix(keys: set[str]) -> str | None:
    """The key prefix of the image tower, as timm's loader looks for it; None when not a ViT .npz."""
    for p in PREFIXES:
        if f"{p}embedding/kernel" in keys:
            return p
    return None


class _Reader:
    """Takes arrays by key (recording them as used) and converts Flax layouts to PyTorch's."""

    def __init__(self, arrays: dict[str, np.ndarray], prefix: str, report: LoadReport):
        self.arrays, self.prefix, self.report = arrays, prefix, report
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.arrays

    def take(self, key: str, idx: int | None = None) -> torch.Tensor:
        full = self.prefix + key
        self.used.add(full)
        a = self.arrays[full]
        return from_numpy(a[idx] if idx is not None else a)

    def put(self, out: dict[str, torch.Tensor], dst: str, src: str, t: torch.Tensor, shape_src=None) -> None:
        """Store `t` as `dst`; recorded as mapped when the source shape (default: unchanged) equals t's."""
        out[dst] = t.contiguous()
        if (shape_src is None or tuple(shape_src) == tuple(t.shape)) and "+" not in src:
            self.report.map(self.prefix + src, dst)
        else:
            self.report.reshape(self.prefix + src, dst, tuple(shape_src or t.shape), tuple(t.shape))


def _attention(r: _Reader, out: dict, mha: str, dst: str, idx: int | None, fused_q: bool) -> int:
    """q/k/v kernels (D, heads, hd) -> fused qkv (3D, D) (or q + kv for MAP); out (heads, hd, D) -> proj (D, D)."""
    names = ("query", "key", "value")
    w = {n: r.take(f"{mha}/{n}/kernel", idx) for n in names}  # each (D, heads, hd)
    b = {n: r.take(f"{mha}/{n}/bias", idx) for n in names}  # each (heads, hd)
    heads = w["query"].shape[1]
    groups = [names] if fused_q else [("query",), ("key", "value")]
    targets = [f"{dst}.qkv"] if fused_q else [f"{dst}.q", f"{dst}.kv"]
    for group, target in zip(groups, targets):
        src = "+".join(f"{mha}/{n}/kernel" for n in group)
        r.put(out, f"{target}.weight", src, torch.cat([w[n].flatten(1).T for n in group]), tuple(w["query"].shape))
        src = "+".join(f"{mha}/{n}/bias" for n in group)
        r.put(out, f"{target}.bias", src, torch.cat([b[n].reshape(-1) for n in group]), tuple(b["query"].shape))
    ow = r.take(f"{mha}/out/kernel", idx)  # (heads, hd, D)
    r.put(out, f"{dst}.proj.weight", f"{mha}/out/kernel", ow.flatten(0, 1).T, tuple(ow.shape))  # (D, heads*hd)
    r.put(out, f"{dst}.proj.bias", f"{mha}/out/bias", r.take(f"{mha}/out/bias", idx))
    return heads


def _layernorm(r: _Reader, out: dict, src: str, dst: str, idx: int | None = None) -> None:
    for s, d in (("scale", "weight"), ("bias", "bias")):
        t = r.take(f"{src}/{s}", idx)
        r.put(out, f"{dst}.{d}", f"{src}/{s}", t, tuple(t.shape))


def _dense(r: _Reader, out: dict, src: str, dst: str, idx: int | None = None) -> None:
    k = r.take(f"{src}/kernel", idx)  # (in, out)
    r.put(out, f"{dst}.weight", f"{src}/kernel", k.T, tuple(k.shape))
    bias = r.take(f"{src}/bias", idx)
    r.put(out, f"{dst}.bias", f"{src}/bias", bias, tuple(bias.shape))


def big_vision_sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """big_vision's `posemb_sincos_2d` (1, h*w, dim): [sin x, cos x, sin y, cos y], frequencies over dim/4 - 1.

    It differs from MoCo v3's table (vitkit's `sincos_2d`: y before x, frequencies over dim/4), so a big_vision
    model keeps its own table as a fixed position embedding.
    """
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / max(dim // 4 - 1, 1))
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega  # (h*w, dim/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float().unsqueeze(0)


def convert_npz(
    arrays: dict[str, np.ndarray], prefix: str, report: LoadReport, img_size: int | tuple[int, int] | None = None
) -> tuple[dict, dict]:
    """Arrays in either layout -> (vitkit state dict, hints). img_size: only for big_vision's sin-cos table."""
    r = _Reader(arrays, prefix, report)
    keys = set(arrays)
    big_vision = (
        prefix.startswith("params/")
        or f"{prefix}pos_embedding" in keys
        or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in keys
    )
    report.format = f"JAX .npz ({'big_vision' if big_vision else 'google-research/vision_transformer'})"
    out: dict[str, torch.Tensor] = {}
    hints: dict = dict(norm_eps=1e-6)

    k = r.take("embedding/kernel")  # (ph, pw, C, D)
    r.put(out, "patch_embed.proj.weight", "embedding/kernel", k.permute(3, 2, 0, 1), tuple(k.shape))
    r.put(out, "patch_embed.proj.bias", "embedding/bias", r.take("embedding/bias"))
    if r.has("cls"):
        r.put(out, "cls_token", "cls", r.take("cls"), tuple(arrays[prefix + "cls"].shape))
    pos_key = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    if r.has(pos_key):
        pe = r.take(pos_key)
        r.put(out, "pos_embed", pos_key, pe.reshape(1, -1, pe.shape[-1]), tuple(pe.shape))
    elif big_vision:  # posemb="sincos2d": a fixed table, computed here exactly at the size asked for
        size = to_2tuple(img_size or 224)
        grid = (size[0] // k.shape[0], size[1] // k.shape[1])
        out["pos_embed"] = big_vision_sincos_2d(grid, k.shape[-1])
        hints["img_size"] = size
        report.note(
            f"no pos_embedding stored: big_vision's fixed sin-cos table computed for {size[0]}x{size[1]} "
            f"({'as asked' if img_size else 'default; pass img_size for another'}) and stored as vitkit's pos_embed"
        )
    _layernorm(r, out, "Transformer/encoder_norm", "norm")
    if r.has("head/kernel"):
        _dense(r, out, "head", "head")

    scanned = r.has("Transformer/encoderblock/LayerNorm_0/scale")
    if scanned:
        depth = arrays[prefix + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = len(
            {m.group(1) for key in keys if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", key))}
        )
    mha_i, mlp_i, ln2_i = (0, 0, 1) if big_vision else (1, 3, 2)
    heads = None
    for i in range(depth):
        blk, idx = ("Transformer/encoderblock", i) if scanned else (f"Transformer/encoderblock_{i}", None)
        _layernorm(r, out, f"{blk}/LayerNorm_0", f"blocks.{i}.norm1", idx)
        heads = _attention(r, out, f"{blk}/MultiHeadDotProductAttention_{mha_i}", f"blocks.{i}.attn", idx, True)
        _layernorm(r, out, f"{blk}/LayerNorm_{ln2_i}", f"blocks.{i}.norm2", idx)
        _dense(r, out, f"{blk}/MlpBlock_{mlp_i}/Dense_0", f"blocks.{i}.mlp.fc1", idx)
        _dense(r, out, f"{blk}/MlpBlock_{mlp_i}/Dense_1", f"blocks.{i}.mlp.fc2", idx)
    if heads is not None:
        hints["num_heads"] = heads

    if r.has("MAPHead_0/probe"):
        r.put(
            out,
            "attn_pool.latent",
            "MAPHead_0/probe",
            r.take("MAPHead_0/probe"),
            tuple(arrays[prefix + "MAPHead_0/probe"].shape),
        )
        _attention(r, out, "MAPHead_0/MultiHeadDotProductAttention_0", "attn_pool", None, False)
        _layernorm(r, out, "MAPHead_0/LayerNorm_0", "attn_pool.norm")
        _dense(r, out, "MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
        _dense(r, out, "MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
    # with average pooling big_vision normalises the tokens before the mean: the final norm, no fc_norm
    if "attn_pool.latent" not in out and "cls_token" not in out:
        hints["global_pool"] = "avg"

    for key in sorted(keys - r.used):
        if not key.startswith(prefix):
            report.ignore(key, f"outside the image tower '{prefix}' (optimizer state or another tower)")
        elif key[len(prefix) :].startswith("pre_logits/"):
            report.ignore(key, "representation layer of early ViT checkpoints; timm drops it too")
        else:
            report.unmatched.append(f"{key} {tuple(arrays[key].shape)}")
    return out, hints


def load_npz(path: Path, img_size: int | tuple[int, int] | None = None) -> Converted:
    arrays = read_npz(path)
    prefix = find_prefix(set(arrays))
    report = LoadReport(str(path), "JAX .npz")
    if prefix is None:
        from ..model.serialization import CheckpointError

        raise CheckpointError(
            f"'{path}': no 'embedding/kernel' under any known prefix {PREFIXES}; not a ViT .npz "
            f"(first keys: {sorted(arrays)[:5]})"
        )
    state, hints = convert_npz(arrays, prefix, report, img_size)
    conv = Converted(state, report, hints=hints)
    conv.preprocess = PreprocessConfig(mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bilinear", crop_pct=1.0)
    report.note(
        "a .npz stores no preprocessing; Google's ViT/big_vision convention used (mean/std 0.5, bilinear, "
        "resize to the input size)"
    )
    return conv


__all__ = ["find_prefix", "convert_npz", "load_npz"]
