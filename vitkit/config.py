"""ViTConfig: every architectural choice of a Vision Transformer in one dataclass, plus the variant table.

Names follow timm's constructor arguments so that `create_model("vit_base_patch16_224", num_classes=10)`
reads the same as in timm, and checkpoints map almost 1:1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # timm's augreg ViTs and big_vision use 0.5 / 0.5
INCEPTION_STD = (0.5, 0.5, 0.5)

POOLS = ("token", "avg", "map", "none")
POS_EMBEDS = ("learn", "sincos2d", "none")
STEMS = ("patch", "conv")
ATTN_BACKENDS = ("auto", "sdpa", "math")


def to_2tuple(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """7 -> (7, 7); (h, w) stays (h, w)."""
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair (h, w), got {v!r}")
    return (int(v[0]), int(v[1]))


@dataclass
class PreprocessConfig:
    """How an image must be prepared for this model; travels inside every checkpoint."""

    input_size: tuple[int, int] = (224, 224)  # (H, W) fed to the model
    mean: tuple[float, ...] = INCEPTION_MEAN
    std: tuple[float, ...] = INCEPTION_STD
    interpolation: str = "bicubic"  # resize filter: bilinear | bicubic | nearest
    crop_pct: float = 0.9  # resize shorter side to size / crop_pct, then center-crop `size`

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "input_size" in d:
            d["input_size"] = to_2tuple(d["input_size"])
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)


@dataclass
class ViTConfig:
    """Architecture of a VisionTransformer. Defaults are ViT-B/16 at 224 px, as in timm."""

    img_size: tuple[int, int] | int = 224
    patch_size: tuple[int, int] | int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # LayerScale init; None = no LayerScale
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # True: position embedding covers patches only, prefix tokens get none
    pos_embed: str = "learn"  # learn | sincos2d | none
    global_pool: str = "token"  # token | avg | map | none
    fc_norm: bool | None = None  # None: LayerNorm after pooling iff global_pool == "avg" (timm's rule)
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP-style)
    stem: str = "patch"  # patch: one strided conv; conv: a small conv stack for tiny images
    # stem="conv" layers as (out_channels, stride) pairs, 3x3 conv + BatchNorm + ReLU each; the strides multiply
    # to the patch size. None: log2(patch) stride-2 layers with widths doubling up to embed_dim.
    stem_layers: tuple[tuple[int, int], ...] | None = None
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over depth
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False  # accept any input size; the position embedding is resampled per call
    attn_backend: str = "auto"  # auto | sdpa | math

    def __post_init__(self) -> None:
        self.img_size = to_2tuple(self.img_size)
        self.patch_size = to_2tuple(self.patch_size)
        if self.global_pool == "":
            self.global_pool = "none"
        if self.stem_layers is not None:  # JSON / YAML give lists
            self.stem_layers = tuple((int(c), int(st)) for c, st in self.stem_layers)
        checks = [
            (self.global_pool in POOLS, f"global_pool must be one of {POOLS}, got {self.global_pool!r}"),
            (self.pos_embed in POS_EMBEDS, f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}"),
            (self.stem in STEMS, f"stem must be one of {STEMS}, got {self.stem!r}"),
            (self.attn_backend in ATTN_BACKENDS, f"attn_backend must be one of {ATTN_BACKENDS}"),
            (self.embed_dim % self.num_heads == 0, f"embed_dim {self.embed_dim} not divisible by {self.num_heads}"),
            (self.global_pool != "token" or self.class_token, "global_pool='token' needs class_token=True"),
            (self.reg_tokens >= 0 and self.depth >= 0, "reg_tokens and depth must be >= 0"),
            (self.stem_layers is None or self.stem == "conv", "stem_layers needs stem='conv'"),
            (
                self.stem_layers is None
                or (
                    self.patch_size[0] == self.patch_size[1] == math.prod(st for _, st in self.stem_layers)
                    and all(c > 0 and st > 0 for c, st in self.stem_layers)
                ),
                f"stem_layers {self.stem_layers}: the strides must multiply to the (square) patch size "
                f"{self.patch_size} and every width and stride be positive",
            ),
            (
                all(i % p == 0 for i, p in zip(self.img_size, self.patch_size)),
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def replace(self, **overrides: Any) -> ViTConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown ViTConfig option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config has unknown key(s) {sorted(unknown)}; was it written by a newer vitkit?")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Variant table. Width/depth/heads from the ViT paper and big_vision (Ti, S, M, B, L, H, g, G).

WIDTHS: dict[str, dict[str, Any]] = {
    "Ti": dict(embed_dim=192, depth=12, num_heads=3),
    "S": dict(embed_dim=384, depth=12, num_heads=6),
    "M": dict(embed_dim=512, depth=12, num_heads=8),
    "B": dict(embed_dim=768, depth=12, num_heads=12),
    "L": dict(embed_dim=1024, depth=24, num_heads=16),
    "H": dict(embed_dim=1280, depth=32, num_heads=16),
    "g": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
    "G": dict(embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13),
}
TIMM_WIDTH_NAMES = {
    "tiny": "Ti",
    "small": "S",
    "medium": "M",
    "base": "B",
    "large": "L",
    "huge": "H",
    "giant": "g",
    "gigantic": "G",
}
HEADS_BY_WIDTH = {v["embed_dim"]: v["num_heads"] for v in WIDTHS.values()}

# Presets for 32x32 images (CIFAR-sized). Small-data ViT literature: patch 4 (64 tokens), narrow and shallow.
SMALL_IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    "vit_cifar_patch4_32": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=9, num_heads=3, mlp_ratio=2.0, num_classes=10
    ),
    "vit_cifar_patch2_32": dict(
        img_size=32, patch_size=2, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0, num_classes=10
    ),
    "vit_digits_patch2_8": dict(
        img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10
    ),
}

_TIMM_NAME = re.compile(
    r"^vit_(?P<width>tiny|small|medium|base|large|huge|giant|gigantic)_patch(?P<patch>\d+)"
    r"(?:_(?P<img>\d+))?(?P<suffix>(?:_[a-z0-9]+)*)$"
)
_BV_NAME = re.compile(r"^(?P<width>Ti|S|M|B|L|H|g|G)/(?P<patch>\d+)$")


def _suffix_options(suffix: str) -> dict[str, Any]:
    """timm name suffixes: _reg4 (register tokens), _gap (avg pool), _map, _sincos, _clsgap, _qknorm."""
    opts: dict[str, Any] = {}
    for part in filter(None, suffix.split("_")):
        if m := re.fullmatch(r"reg(\d+)", part):
            opts["reg_tokens"] = int(m.group(1))
        elif part == "gap":
            opts.update(global_pool="avg", class_token=False)
        elif part == "clsgap":
            opts.update(global_pool="avg")
        elif part == "map":
            opts.update(global_pool="map", class_token=False)
        elif part == "sincos":
            opts["pos_embed"] = "sincos2d"
        elif part == "qknorm":
            opts["qk_norm"] = True
        elif part in ("in1k", "in21k", "augreg", "orig", "dinov2", "lvd142m", "ft"):
            continue  # pretrained-tag parts say where weights came from, not the shape
        else:
            raise ValueError(f"unknown model-name suffix {part!r}")
    return opts


def config_from_name(name: str, **overrides: Any) -> ViTConfig:
    """Decode a model name into a ViTConfig.

    Accepts timm names (`vit_base_patch16_224`, `vit_small_patch14_reg4_dinov2`), big_vision short names
    (`"S/16"`) and the small-image presets (`vit_cifar_patch4_32`). Overrides win.
    """
    name = name.split(".")[0]  # timm pretrained tags: vit_base_patch16_224.augreg_in21k
    if name in SMALL_IMAGE_PRESETS:
        base: dict[str, Any] = dict(SMALL_IMAGE_PRESETS[name])
    elif m := _BV_NAME.match(name):
        base = dict(WIDTHS[m.group("width")], patch_size=int(m.group("patch")))
    elif m := _TIMM_NAME.match(name):
        base = dict(WIDTHS[TIMM_WIDTH_NAMES[m.group("width")]], patch_size=int(m.group("patch")))
        if m.group("img"):
            base["img_size"] = int(m.group("img"))
        base.update(_suffix_options(m.group("suffix")))
    else:
        known = ", ".join(list(SMALL_IMAGE_PRESETS) + ["vit_<tiny|small|base|large|huge>_patch<P>_<IMG>", "B/16"])
        raise ValueError(f"unknown model name {name!r}; known forms: {known}")
    base.update(overrides)
    return ViTConfig(**base)


def list_models() -> list[str]:
    """The names `create_model` knows without overrides (a representative list, not every combination)."""
    timm_names = [
        f"vit_{w}_patch{p}_{s}"
        for w, ps in [
            ("tiny", (16,)),
            ("small", (8, 16, 32)),
            ("medium", (16,)),
            ("base", (8, 16, 32)),
            ("large", (14, 16, 32)),
            ("huge", (14,)),
        ]
        for p in ps
        for s in (224, 384)
    ]
    return sorted(SMALL_IMAGE_PRESETS) + timm_names + [f"{w}/{p}" for w in WIDTHS for p in (8, 14, 16, 32)]


def default_preprocess(cfg: ViTConfig) -> PreprocessConfig:
    """A sensible preprocessing spec for a freshly built model: 0.5/0.5 normalisation, no crop for tiny images."""
    crop = 1.0 if max(cfg.img_size) <= 64 else 0.9
    stats = (0.5,) * cfg.in_chans  # one mean/std per input channel, so 1-channel models round-trip
    return PreprocessConfig(input_size=cfg.img_size, mean=stats, std=stats, crop_pct=crop, interpolation="bicubic")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ViTConfig)]


__all__ = [
    "ViTConfig",
    "PreprocessConfig",
    "config_from_name",
    "list_models",
    "default_preprocess",
    "to_2tuple",
    "HEADS_BY_WIDTH",
    "WIDTHS",
    "field_names",
]
