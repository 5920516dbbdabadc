"""Explain a prediction with a picture: where the model looked, as a heatmap over the image it saw.

Methods:
- "attention": one layer's attention to each patch: from the class token, or (models without one, e.g. avg
  pooling) the mean over all patch queries. Heads averaged, fused by max/min, one head, or every head.
- "rollout": attention rollout through the layers up to `layer` (residual term, optional discard of the lowest
  attentions), read at the class token's row (or the mean patch row without a class token).
- "grad-rollout": the rollout of attention weighted by its gradient for one class (`target`; default each image's
  top class), after Chefer et al. 2021: the only method whose map changes with the class asked about.

`keep_mass` (DINO's visualisation) turns each map into the smallest set of patches that holds that fraction of
its attention, drawn as a mask over the image.

Only the layers a method needs run the explicit attention path (`model(x, return_attention=[...])`); the others
keep the fast one. Register tokens take part in the computation but are left out of the picture. The map is
drawn over the preprocessed crop, the exact pixels the model was given, at any input size the model accepts.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.decode import ImageDecodeError, display_name
from .attention_maps import (
    HeadChoice,
    attention_gradients,
    attention_rollout,
    cls_attention,
    gradient_rollout,
    keep_mass_mask,
    patch_attention,
    rollout_map,
    to_unit_range,
)
from .predict import Failure, ImageInput, Prediction, Predictor, _name_of

METHODS = ("attention", "rollout", "grad-rollout")


@dataclass
class Explanation:
    """One image's map and what it shows."""

    image: str
    crop: np.ndarray  # (h, w, 3) uint8: the preprocessed crop the model saw (before normalisation)
    heat: np.ndarray  # (gh, gw) or (heads, gh, gw) float32 on the patch grid, each map summing to 1
    description: str  # what the map shows, in words (goes into titles, logs and HTTP headers)
    prediction: Prediction
    mask: np.ndarray | None = None  # bool, heat's shape: the smallest patch set holding `keep_mass` of each map
    keep_mass: float | None = None

    @property
    def title(self) -> str:
        if not self.prediction.labels:  # a headless encoder (e.g. pretrained): attention, no class
            return "(no head: attention only)"
        return f"{self.prediction.labels[0]} ({self.prediction.probs[0]:.1%})"


def parse_head(text: str | int) -> HeadChoice:
    """CLI/HTTP text -> head choice: "mean", "max", "min", "all", or an int."""
    if isinstance(text, int) or text in ("mean", "max", "min", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"head must be an index, 'mean', 'max', 'min' or 'all', got {text!r}") from None


def parse_class(text: str | int | None, labels: Sequence[str]) -> int | None:
    """CLI/HTTP class -> its index: a class name of the model, else an index (None stays None: the top class).

    A name wins over an index, so a model whose class names are numbers in another order is read by name.
    """
    if text is None or text == "":
        return None
    if isinstance(text, str) and text in labels:
        return list(labels).index(text)
    try:
        index = int(text)
    except ValueError:
        shown = ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "")
        raise ValueError(f"class {text!r} is neither a class of this model ({shown}) nor an index") from None
    if not 0 <= index < len(labels):
        raise ValueError(f"class {index} does not exist: the model has {len(labels)} classes (0..{len(labels) - 1})")
    return index


class Explainer:
    """Attention maps for a Predictor's model.

    Args:
        predictor: the loaded model with its preprocessing (its torch model is used even when predictions come
            from another backend, since maps need the explicit attention path).
        method: "attention" (one layer) or "rollout" (all layers up to `layer`).
        layer: block index, negative counts from the end (default: the last block).
        head: "mean" | "max" | "min" | an index | "all" (a per-head grid; attention method only).
        discard: rollout only: fraction of lowest attentions zeroed in each layer (the cls column is kept).
        keep_mass: also mark, in each map, the smallest patch set holding this fraction of its mass (e.g. 0.6).
        target: grad-rollout only: the class index the map explains (default: each image's top class).
    """

    def __init__(
        self,
        predictor: Predictor,
        method: str = "attention",
        layer: int = -1,
        head: HeadChoice = "mean",
        discard: float = 0.0,
        keep_mass: float | None = None,
        target: int | None = None,
    ):
        model = predictor.model
        depth = len(model.blocks)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} does not exist: the model has {depth} blocks (0..{depth - 1}, or -1)")
        if method != "attention" and head == "all":
            raise ValueError(f"--head all (one map per head) works with --method attention; {method} fuses heads")
        if target is not None and method != "grad-rollout":
            raise ValueError(f"--class applies to --method grad-rollout only; {method} maps do not depend on the class")
        if target is not None and not 0 <= target < model.cfg.num_classes:
            raise ValueError(f"class {target} does not exist: the model has {model.cfg.num_classes} classes")
        if discard and method != "rollout":
            raise ValueError("--discard applies to --method rollout only")
        if head not in ("mean", "max", "min", "all") and not -model.cfg.num_heads <= int(head) < model.cfg.num_heads:
            raise ValueError(f"head {head} does not exist: the model has {model.cfg.num_heads} heads")
        if keep_mass is not None and not 0.0 < keep_mass <= 1.0:
            raise ValueError(f"--keep-mass must be in (0, 1], got {keep_mass}")
        self.predictor = predictor
        self.method = method
        self.layer = layer % depth
        self.head = head
        self.discard = discard
        self.keep_mass = keep_mass
        self.target = target
        self.description = self._describe()

    def _describe(self) -> str:
        cfg = self.predictor.model.cfg
        depth = cfg.depth
        heads = {"mean": "heads averaged", "max": "heads fused by max", "min": "heads fused by min"}
        heads_text = heads.get(self.head, "every head") if isinstance(self.head, str) else f"head {self.head}"
        last = " (last)" if self.layer == depth - 1 else ""
        no_cls = f"no class token ({cfg.global_pool} pooling)"
        if self.method == "attention":
            what = (
                "class-token attention to each patch"
                if cfg.class_token
                else f"{no_cls}: mean attention of all patches to each patch"
            )
            text = f"{what}, layer {self.layer}{last}, {heads_text}"
        else:
            what = "class-token row" if cfg.class_token else f"{no_cls}: mean over patch rows"
            discard = f", lowest {self.discard:.0%} discarded" if self.discard else ""
            text = f"attention rollout, layers 0-{self.layer}, {heads_text}{discard}, {what}"
        if self.method == "grad-rollout":
            labels = self.predictor.labels
            target = "each image's top class" if self.target is None else f"class {labels[self.target]!r}"
            text = f"gradient-weighted {text} (Chefer et al. 2021), for {target}"
        if self.keep_mass is not None:
            text += f"; the smallest patch set holding {self.keep_mass:.0%} of the attention"
        if cfg.reg_tokens:
            text += f"; {cfg.reg_tokens} register token{'s' if cfg.reg_tokens > 1 else ''} left out"
        return text

    def layers_needed(self) -> list[int]:
        """The blocks that must return their attention map (all others keep the fast path)."""
        return [self.layer] if self.method == "attention" else list(range(self.layer + 1))

    def _gradient_maps(self, batch: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """grad-rollout: logits (B, classes) and maps (B, gh, gw) from one fp32 forward and backward.

        fp32 rather than bf16: the map multiplies gradients through every layer, and bf16's 3 significant digits
        would blur it. The gradient goes to the attention maps only (torch.autograd.grad), never into the weights.
        """
        model = self.predictor.model
        layers = self.layers_needed()
        x = batch.detach().clone().requires_grad_(True)  # a graph even when every weight is frozen
        with torch.enable_grad():
            logits, attn = model(x, return_attention=layers)  # {layer: (B, heads, N, N)}
            if targets is None:
                targets = logits.argmax(dim=-1) if self.target is None else torch.full((len(x),), self.target)
            score = logits.gather(1, targets.to(logits.device, torch.long)[:, None]).sum()  # image b: its maps only
            maps = [attn[i] for i in layers]
            grads = attention_gradients(score, maps)
        relevance = gradient_rollout([m.detach() for m in maps], grads, self.head)
        heat = rollout_map(relevance, model.num_prefix_tokens, model.patch_grid(batch), model.cfg.class_token)
        return logits.detach().float(), heat

    def maps(self, batch: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> logits (B, classes) and heatmaps (B, gh, gw), or (B, heads, gh, gw) with head="all".

        targets: grad-rollout only: one class index per image (B,), instead of the explainer's `target`.
        """
        if targets is not None and self.method != "grad-rollout":
            raise ValueError(f"per-image classes apply to grad-rollout only; {self.method} maps ignore the class")
        if self.method == "grad-rollout":
            return self._gradient_maps(batch, targets)
        model = self.predictor.model
        grid = model.patch_grid(batch)
        P = model.num_prefix_tokens
        with torch.inference_mode(), torch.autocast(batch.device.type, torch.bfloat16):
            logits, attn = model(batch, return_attention=self.layers_needed())  # {layer: (B, heads, N, N)}
        if self.method == "attention":
            a = attn[self.layer].float()
            heat = (cls_attention if model.cfg.class_token else patch_attention)(a, P, grid, self.head)
        else:
            rollout = attention_rollout([attn[i] for i in self.layers_needed()], self.head, self.discard)
            heat = rollout_map(rollout, P, grid, has_cls=model.cfg.class_token)
        return logits.float(), heat

    def explain(
        self,
        images: Sequence[ImageInput],
        topk: int = 5,
        names: Sequence[str] | None = None,
        errors: str = "raise",
    ) -> list[Explanation | Failure]:
        """Decode, preprocess and explain images (one batch); errors="collect" turns bad images into Failures."""
        names = list(names) if names is not None else [_name_of(im, i) for i, im in enumerate(images)]
        results: list[Explanation | Failure | None] = [None] * len(images)
        good: list[tuple[int, np.ndarray]] = []
        for i, image in enumerate(images):
            try:
                good.append((i, self.predictor.decode(image, names[i])))
            except ImageDecodeError as e:
                if errors == "raise":
                    raise
                results[i] = Failure(names[i], str(e))
        if good:
            batch = torch.stack([self.predictor.prepare(rgb) for _, rgb in good])  # (B, C, h, w)
            crops = [self.predictor.crop(rgb) for _, rgb in good]
            for (i, _), e in zip(good, self.explain_batch(batch, crops, [names[i] for i, _ in good], topk)):
                results[i] = e
        return results  # type: ignore[return-value]

    def explain_batch(
        self, batch: torch.Tensor, crops: Sequence[np.ndarray], names: Sequence[str], topk: int = 5
    ) -> list[Explanation]:
        """Already preprocessed images (B, C, h, w) with their display crops -> Explanations."""
        logits, heat = self.maps(batch)
        preds = self.predictor.top_k(logits, names, topk)
        masks = keep_mass_mask(heat, self.keep_mass).numpy() if self.keep_mass is not None else [None] * len(heat)
        return [
            Explanation(name, crop, h.numpy().astype(np.float32), self.description, pred, m, self.keep_mass)
            for name, crop, h, pred, m in zip(names, crops, heat, preds, masks)
        ]


# ------------------------------------------------------------------------------------------------ drawing
def colorize(heat: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 through a matplotlib colormap."""
    from ..optional import require

    colormaps = require("matplotlib", "attention heatmaps (vitkit explain)").colormaps
    return (colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay(crop: np.ndarray, heat: np.ndarray, size: int = 320, alpha: float = 0.55, cmap: str = "inferno"):
    """The crop scaled so its longer side is `size`, with the heatmap upsampled over it: (H', W', 3) uint8.

    The heatmap (gh, gw) covers the crop exactly (the grid is the crop divided into patches), so it is
    upsampled bilinearly to the same display size and blended with weight `alpha`.
    """
    from PIL import Image

    h, w = crop.shape[:2]
    scale = size / max(h, w)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.NEAREST if scale >= 4 else Image.Resampling.BICUBIC  # tiny crops stay crisp
    base = np.asarray(Image.fromarray(crop).resize((out_w, out_h), resample), dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]  # (1, 1, gh, gw)
    up = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False)[0, 0]
    color = colorize(to_unit_range(up).numpy(), cmap).astype(np.float32)
    return ((1 - alpha) * base + alpha * color + 0.5).clip(0, 255).astype(np.uint8)


def mask_overlay(crop: np.ndarray, mask: np.ndarray, size: int = 320, color: tuple[int, int, int] = (255, 200, 0)):
    """The crop scaled so its longer side is `size`, the patches outside `mask` (gh, gw) dimmed and those inside
    tinted with `color`: (H', W', 3) uint8. The mask covers the crop exactly, so it is upsampled by repetition."""
    from PIL import Image

    h, w = crop.shape[:2]
    scale = size / max(h, w)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.NEAREST if scale >= 4 else Image.Resampling.BICUBIC
    base = np.asarray(Image.fromarray(crop).resize((out_w, out_h), resample), dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]  # (1, 1, gh, gw)
    inside = F.interpolate(t, size=(out_h, out_w), mode="nearest")[0, 0].numpy()[..., None] > 0.5
    tinted = 0.6 * base + 0.4 * np.asarray(color, dtype=np.float32)
    return np.where(inside, tinted, 0.25 * base).round().clip(0, 255).astype(np.uint8)


def _mask_panels(expl: Explanation, size: int) -> list[tuple[str, np.ndarray]]:
    """One panel per head (or fused map): its kept patch set over the crop, titled with the set's size."""
    from ..optional import require

    colormaps = require("matplotlib", "attention masks (vitkit explain --keep-mass)").colormaps
    masks = expl.mask if expl.mask.ndim == 3 else expl.mask[None]
    panels = []
    for i, m in enumerate(masks):
        color = tuple(int(255 * c) for c in colormaps["tab10"](i % 10)[:3])
        name = f"head {i}" if len(masks) > 1 else "kept patches"
        panels.append(
            (f"{name}: {int(m.sum())}/{m.size} hold {expl.keep_mass:.0%}", mask_overlay(expl.crop, m, size, color))
        )
    return panels


def overlay_png(expl: Explanation, size: int = 320, max_width: int = 4096) -> bytes:
    """A plain PNG of the overlay (the mean map, or every head's maps side by side, at most max_width wide)."""
    from PIL import Image

    maps = expl.heat if expl.heat.ndim == 3 else expl.heat[None]
    size = max(32, min(size, max_width // len(maps)))
    tiles = [overlay(expl.crop, m, size) for m in maps]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, axis=1)).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(expl: Explanation, size: int = 320) -> bytes:
    """A titled figure: the crop, then the overlay (or one overlay per head in a grid). Returns PNG bytes."""
    from ..optional import require

    Figure = require("matplotlib.figure", "attention figures (vitkit explain)").Figure
    maps = expl.heat if expl.heat.ndim == 3 else expl.heat[None]
    panels = [("input (preprocessed crop)", np.asarray(overlay(expl.crop, np.zeros((1, 1)), size, alpha=0.0)))]
    if expl.mask is not None:
        panels += _mask_panels(expl, size)
    elif len(maps) == 1:
        panels.append(("where it looked", overlay(expl.crop, maps[0], size)))
    else:
        panels += [(f"head {i}", overlay(expl.crop, m, size)) for i, m in enumerate(maps)]
    cols = min(len(panels), 5)
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + 0.7), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    desc = _wrap(expl.description, 30 * cols)
    fig.suptitle(f"{display_name(expl.image)}: predicted {expl.title}\n{desc}", fontsize=9)  # non-UTF-8 names
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, max(width, 20)))


__all__ = [
    "Explainer",
    "Explanation",
    "METHODS",
    "parse_head",
    "parse_class",
    "colorize",
    "overlay",
    "mask_overlay",
    "overlay_png",
    "figure_png",
]
