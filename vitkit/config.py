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

POOLS = ("token", "avg", "map", "seqpool", "none")
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
    global_pool: str = "token"  # token | avg | map | seqpool (CCT's sequence pooling) | none
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
    # patch dropout (PatchDropout, Liu et al. 2022; FLIP): in training each image keeps a random round((1 - rate) * N)
    # of its N patch tokens, prefix tokens always; eval, inference and forward_intermediates see every token
    patch_drop_rate: float = 0.0
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
            (
                isinstance(self.patch_drop_rate, (int, float))
                and not isinstance(self.patch_drop_rate, bool)
                and 0 <= self.patch_drop_rate < 1,
                f"patch_drop_rate must be a number in [0, 1), got {self.patch_drop_rate!r}",
            ),
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

# timm's further width names. Kept out of HEADS_BY_WIDTH: the head count inferred for a bare checkpoint comes from
# the ViT paper's widths only (1536 alone has 16 heads in giantopt and 24 in DINOv2-giant).
TIMM_EXTRA_WIDTHS: dict[str, dict[str, Any]] = {
    "xsmall": dict(embed_dim=256, depth=10, num_heads=4),
    "wee": dict(embed_dim=256, depth=14, num_heads=4, mlp_ratio=5.0),
    "little": dict(embed_dim=320, depth=14, num_heads=5, mlp_ratio=5.6),
    "mediumd": dict(embed_dim=512, depth=20, num_heads=8),
    "betwixt": dict(embed_dim=640, depth=12, num_heads=10),
    "so150m": dict(embed_dim=896, depth=18, num_heads=14, mlp_ratio=2.572),
    "so150m2": dict(embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13),
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362),
    "giantopt": dict(embed_dim=1536, depth=40, num_heads=16),
}

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

_WIDTH_BY_NAME: dict[str, dict[str, Any]] = {
    **{name: WIDTHS[short] for name, short in TIMM_WIDTH_NAMES.items()},
    **TIMM_EXTRA_WIDTHS,
}
_WIDTH_PATTERN = "|".join(sorted(_WIDTH_BY_NAME, key=len, reverse=True))  # longest first: mediumd before medium
_TIMM_NAME = re.compile(
    rf"^vit_(?P<width>{_WIDTH_PATTERN})_patch(?P<patch>\d+)"
    r"(?:_(?P<img>\d+))?(?P<suffix>(?:_[a-z0-9]+)*?)(?:_(?P<last>\d+))?$"
)
_BV_NAME = re.compile(r"^(?P<width>Ti|S|M|B|L|H|g|G)/(?P<patch>\d+)$")
_SIZE_SUFFIX = re.compile(r"^(?P<family>.+)_(?P<size>\d+)$")


class UnsupportedModelError(ValueError):
    """A model name vitkit recognises but does not build: its architecture needs a layer vitkit does not have."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"{name!r}: vitkit has no {reason}")


# timm `vit_*` names whose architecture is not vitkit's, checked before any other rule so that they fail with the
# reason rather than as an unknown suffix. First match wins. docs/timm-names.md lists every timm name against these.
UNSUPPORTED_TIMM_NAMES: tuple[tuple[str, str], ...] = (
    (
        r"_relpos_|^vit_srelpos_",
        "relative-position ViT (timm's VisionTransformerRelPos: a relative position bias in every attention layer)",
    ),
    (
        r"_r\d+_s\d+_|_r_s\d+_p\d+_|_resnet\d+d(_s\d+)?_|^vit_base_mci_",
        "hybrid ViT (a CNN backbone makes the tokens; vitkit's tokenizer is a patch embedding or its small conv stem)",
    ),
    (
        r"_rope_|_dinov3|^vit_pe_|_sapiens2$|_lingbot$",
        "rotary position embedding (timm builds this name from its EVA blocks, timm.models.eva)",
    ),
    (r"_\d+x[2-9]\d*_", "parallel blocks (timm's ParallelThingsBlock: several attention and MLP branches per layer)"),
    (r"^vit_dpwee_", "differential attention in parallel-scaling blocks (timm's DiffParallelScalingBlock)"),
    (
        r"_xp_|^vit_pwee_",
        "parallel-scaling blocks (timm's ParallelScalingBlock: attention and MLP in parallel, one fused input layer)",
    ),
    (r"^vit_d(wee|little)_", "differential attention (timm's DiffAttention: the difference of two softmax maps)"),
    (r"_rpn_", "res-post-norm block (timm's ResPostBlock: the LayerNorm after each residual branch, not before)"),
    (r"_clip_quickgelu_", "QuickGELU activation, nor a bias-free patch embedding (OpenAI CLIP)"),
    (
        r"_clip_",
        "bias-free patch embedding (CLIP); from_pretrained still loads such weights, with an equivalent zero bias",
    ),
    (r"_radio_v\d|^vit_intern300m_", "option to leave out the final LayerNorm (timm's final_norm=False)"),
    (
        r"^vit_base_patch32_siglip_|^vit_so400m_patch16_siglip_|^vit_giantopt_|^vit_large_patch16_siglip(_gap)?_512$",
        "tanh-approximated GELU (timm's act_layer='gelu_tanh'; vitkit's MLP uses the exact GELU)",
    ),
    (r"^vit_giant_patch14_(reg\d+_)?(dinov2|tipsv2)$", "SwiGLU MLP (timm's GluMlp with SiLU)"),
)

_GAP_FINAL_NORM = dict(class_token=False, global_pool="avg", fc_norm=False)  # average pool after the final norm
_MEDIUM_GAP = dict(_GAP_FINAL_NORM, qkv_bias=False, init_values=1e-6)


def _reg_gap(registers: int) -> dict[str, Any]:
    """timm's register recipe: LayerScale, no class token, registers without position embedding, average pool."""
    return dict(init_values=1e-5, class_token=False, no_embed_class=True, reg_tokens=registers, global_pool="avg")


_DINOV2 = dict(img_size=518, init_values=1e-5)
_TIPSV2 = dict(img_size=448, init_values=1.0, reg_tokens=1, no_embed_class=True)
_SIGLIP_MAP = dict(class_token=False, global_pool="map")

# timm names whose options the name does not spell: timm's model functions fix them per name. Key: the name without
# its trailing image size; value: (the sizes timm registers, the options beyond width and patch). A key without
# sizes is a whole name (its size, if any, is in the options or right after the patch). timm's so400m_patch14 at 384
# is left out of the sizes: 384 is not a whole number of 14-pixel patches (_check_whole_patches).
TIMM_FAMILIES: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "vit_small_patch16_36x1": ((224,), dict(depth=36, init_values=1e-5)),
    "vit_base_patch16_224_miil": ((), dict(qkv_bias=False)),
    "vit_base_patch16_plus": ((240,), dict(embed_dim=896, num_heads=14, init_values=1e-5)),
    "vit_base_patch32_plus": ((256,), dict(embed_dim=896, num_heads=14, init_values=1e-5)),
    "vit_base_patch16_gap": ((224,), dict(_GAP_FINAL_NORM, num_heads=16)),
    "vit_huge_patch14_gap": ((224,), _GAP_FINAL_NORM),
    "vit_huge_patch16_gap": ((448,), _GAP_FINAL_NORM),
    "vit_giant_patch16_gap": ((224,), _GAP_FINAL_NORM),
    "vit_medium_patch16_gap": ((240, 256, 384), _MEDIUM_GAP),
    "vit_betwixt_patch16_gap": ((256,), _MEDIUM_GAP),
    "vit_base_patch16_reg4_gap": ((256,), dict(_reg_gap(4), init_values=None)),
    "vit_medium_patch16_reg1_gap": ((256,), _reg_gap(1)),
    "vit_medium_patch16_reg4_gap": ((256,), _reg_gap(4)),
    "vit_mediumd_patch16_reg4_gap": ((256, 384), _reg_gap(4)),
    "vit_betwixt_patch16_reg1_gap": ((256,), _reg_gap(1)),
    "vit_betwixt_patch16_reg4_gap": ((256, 384), _reg_gap(4)),
    "vit_little_patch16_reg1_gap": ((256,), _reg_gap(1)),
    "vit_little_patch16_reg4_gap": ((256,), _reg_gap(4)),
    "vit_wee_patch16_reg1_gap": ((256,), _reg_gap(1)),
    "vit_so150m_patch16_reg4_gap": ((256, 384), dict(_GAP_FINAL_NORM, reg_tokens=4)),
    "vit_so150m_patch16_reg4_map": ((256,), dict(_SIGLIP_MAP, reg_tokens=4)),
    "vit_so150m2_patch16_reg1_gap": (
        (256, 384, 448),
        dict(init_values=1e-5, qkv_bias=False, class_token=False, reg_tokens=1, global_pool="avg"),
    ),
    **{f"vit_{w}_patch14_dinov2": ((), _DINOV2) for w in ("small", "base", "large")},
    **{
        f"vit_{w}_patch14_reg4_dinov2": ((), dict(_DINOV2, reg_tokens=4, no_embed_class=True))
        for w in ("small", "base", "large")
    },
    **{f"vit_{w}_patch14_reg1_tipsv2": ((), _TIPSV2) for w in ("base", "large", "so400m")},
    "vit_base_patch16_siglip": ((224, 256, 384, 512), _SIGLIP_MAP),
    "vit_large_patch16_siglip": ((256, 384), _SIGLIP_MAP),
    "vit_so400m_patch14_siglip": ((224, 378), _SIGLIP_MAP),
    "vit_base_patch16_siglip_gap": ((224, 256, 384, 512), _GAP_FINAL_NORM),
    "vit_large_patch16_siglip_gap": ((256, 384), _GAP_FINAL_NORM),
    "vit_so400m_patch14_siglip_gap": ((224, 378, 448, 896), _GAP_FINAL_NORM),
}


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


def _check_supported(name: str) -> None:
    """Raise UnsupportedModelError for a timm name whose architecture vitkit does not have."""
    for pattern, reason in UNSUPPORTED_TIMM_NAMES:
        if re.search(pattern, name):
            raise UnsupportedModelError(name, reason)


def _check_whole_patches(name: str, options: dict[str, Any]) -> None:
    """A named size that is not a multiple of the patch (timm's so400m_patch14_siglip_384): timm's strided conv
    silently ignores the pixels past the last whole patch; vitkit's patch grid refuses such inputs."""
    size, patch = options.get("img_size"), options.get("patch_size", 16)
    if isinstance(size, int) and isinstance(patch, int) and size % patch:
        whole = size // patch * patch
        raise UnsupportedModelError(
            name,
            f"patch embedding that drops pixels past the last whole patch ({size} is not a multiple of {patch}; "
            f"timm's conv ignores the last {size - whole} rows and columns); create_model({name!r}, "
            f"img_size={whole}) has the same weights",
        )


def _family_options(name: str) -> dict[str, Any] | None:
    """Options of a name in TIMM_FAMILIES (the width and patch from the name, the rest from the table), else None."""
    size = None
    if name in TIMM_FAMILIES:
        family = name
    elif (m := _SIZE_SUFFIX.match(name)) and m.group("family") in TIMM_FAMILIES:
        family, size = m.group("family"), int(m.group("size"))
    else:
        return None
    sizes, options = TIMM_FAMILIES[family]
    if sizes and size is None:
        raise ValueError(f"model name {name!r} needs an image size, e.g. {family}_{sizes[0]}")
    parsed = _TIMM_NAME.match(family)
    assert parsed is not None, f"TIMM_FAMILIES key {family!r} does not parse as vit_<width>_patch<P>..."
    base = dict(_WIDTH_BY_NAME[parsed.group("width")], patch_size=int(parsed.group("patch")))
    if parsed.group("img"):
        base["img_size"] = int(parsed.group("img"))
    base.update(options)
    if size is not None:
        base["img_size"] = size
    return base


def _generic_options(m: re.Match[str]) -> dict[str, Any]:
    """vit_<width>_patch<P>[_<IMG>][_<suffix>...][_<IMG>]: the width table plus what the suffixes spell."""
    base = dict(_WIDTH_BY_NAME[m.group("width")], patch_size=int(m.group("patch")))
    if m.group("img") and m.group("last"):
        raise ValueError(f"model name {m.string!r} gives two image sizes")
    if size := m.group("img") or m.group("last"):
        base["img_size"] = int(size)
    base.update(_suffix_options(m.group("suffix")))
    return base


def config_from_name(name: str, **overrides: Any) -> ViTConfig:
    """Decode a model name into a ViTConfig.

    Accepts timm names (`vit_base_patch16_224`, `vit_small_patch14_reg4_dinov2`, `vit_base_patch16_reg4_gap_256`),
    big_vision short names (`"S/16"`) and the small-image presets (`vit_cifar_patch4_32`). Overrides win. A timm
    name whose architecture vitkit does not have raises UnsupportedModelError naming what is missing.
    """
    name = name.split(".")[0]  # timm pretrained tags: vit_base_patch16_224.augreg_in21k
    if name in SMALL_IMAGE_PRESETS:
        base: dict[str, Any] = dict(SMALL_IMAGE_PRESETS[name])
    elif m := _BV_NAME.match(name):
        base = dict(WIDTHS[m.group("width")], patch_size=int(m.group("patch")))
    else:
        if name.startswith("vit_"):
            _check_supported(name)
        family = _family_options(name)
        if family is not None:
            base = family
        elif m := _TIMM_NAME.match(name):
            base = _generic_options(m)
        else:
            known = ", ".join(list(SMALL_IMAGE_PRESETS) + ["vit_<tiny|small|base|large|huge>_patch<P>_<IMG>", "B/16"])
            raise ValueError(f"unknown model name {name!r}; known forms: {known}")
    base.update(overrides)
    if "img_size" not in overrides:  # an explicit size is the caller's; ViTConfig checks it
        _check_whole_patches(name, base)
    return ViTConfig(**base)


def timm_family_names() -> list[str]:
    """Every timm name TIMM_FAMILIES spells (family x registered size)."""
    return sorted(
        f"{family}_{s}" if sizes else family for family, (sizes, _) in TIMM_FAMILIES.items() for s in sizes or (0,)
    )


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
    bv_names = [f"{w}/{p}" for w in WIDTHS for p in (8, 14, 16, 32)]
    return sorted(SMALL_IMAGE_PRESETS) + sorted(set(timm_names) | set(timm_family_names())) + bv_names


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
    "timm_family_names",
    "UnsupportedModelError",
    "UNSUPPORTED_TIMM_NAMES",
    "TIMM_FAMILIES",
    "default_preprocess",
    "to_2tuple",
    "HEADS_BY_WIDTH",
    "WIDTHS",
    "field_names",
]
