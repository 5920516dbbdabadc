"""The model card (README.md) written beside exported weights, in the Hub's format (YAML front matter, Markdown).

It says what the model is (architecture, parameters, preprocessing), what it was trained on and how well it did,
and how to load it. Data and metrics come from where vitkit recorded them: the checkpoint's metadata and, when
the checkpoint sits in a run folder (`vitkit train` writes runs/X/model.safetensors beside runs/X/metrics.jsonl),
the run's metrics records. Nothing is invented: what was not recorded is said to be unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import WIDTHS
from ..model import VisionTransformer
from ..model.serialization import WEIGHTS_FILE, is_vitkit_checkpoint, read_metadata
from ..version import __version__

README = "README.md"
METRICS_FILE = "metrics.jsonl"  # vitkit.train.logging's file name; read through its read_metrics
LIBRARIES = {"vitkit": "vitkit", "hf": "transformers", "timm": "timm"}
FORMAT_NAMES = {
    "vitkit": "vitkit safetensors (config, preprocessing and class names inside the file)",
    "hf": "Hugging Face transformers ViT (config.json, preprocessor_config.json)",
    "timm": "timm Hub folder (config.json with architecture, model_args, pretrained_cfg)",
}
# keys of vitkit's safetensors metadata that describe the file itself rather than its history
_FORMAT_KEYS = {"format", "format_version", "config", "preprocess", "labels"}
_SHOWN_CLASSES = 20
_SHOWN_EVALUATIONS = 10


@dataclass
class RunRecord:
    """What vitkit recorded about how a checkpoint came to be."""

    provenance: dict[str, str] = field(default_factory=dict)  # checkpoint metadata: steps, val_top1, converted_from
    train_config: dict[str, Any] = field(default_factory=dict)  # the run's "info" record: data, epochs, ...
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # the run's "val" records
    final: dict[str, Any] = field(default_factory=dict)  # the run's "final" record


def read_run_record(source: str | Path | None) -> RunRecord:
    """The checkpoint's metadata and, when its folder holds a metrics.jsonl, the run's records."""
    record = RunRecord()
    if source is None:
        return record
    path = Path(source)
    checkpoint = path / WEIGHTS_FILE if path.is_dir() else path
    if is_vitkit_checkpoint(checkpoint):
        record.provenance = {k: v for k, v in read_metadata(checkpoint).items() if k not in _FORMAT_KEYS}
    run_dir = path if path.is_dir() else path.parent
    if (run_dir / METRICS_FILE).is_file():
        from ..train.logging import read_metrics  # only for run folders: the train package is not light

        for rec in read_metrics(run_dir):
            kind = rec.get("kind")
            if kind == "info" and isinstance(rec.get("config"), dict):
                record.train_config = rec["config"]
            elif kind == "val":
                record.evaluations.append(rec)
            elif kind == "final":
                record.final = rec
    return record


# --------------------------------------------------------------------------------------------- sections
def variant_name(model: VisionTransformer) -> str:
    """ "ViT-S/16" when width, depth and heads are a standard variant's; else the numbers."""
    cfg = model.cfg
    patch = "x".join(str(p) for p in dict.fromkeys(cfg.patch_size))
    for name, dims in WIDTHS.items():
        if (dims["embed_dim"], dims["depth"], dims["num_heads"]) == (cfg.embed_dim, cfg.depth, cfg.num_heads):
            return f"ViT-{name}/{patch}"
    return f"ViT, width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, patch {patch}"


def _front_matter(model: VisionTransformer, fmt: str, license: str | None) -> str:
    tags = ["vitkit", "vision-transformer", "image-classification"]
    if fmt != "vitkit":
        tags.append(LIBRARIES[fmt])
    lines = ["---", f"library_name: {LIBRARIES[fmt]}", "tags:", *(f"- {t}" for t in tags)]
    task = "image-classification" if model.cfg.num_classes > 0 else "image-feature-extraction"
    lines.append(f"pipeline_tag: {task}")
    if license:
        lines.append(f"license: {license}")
    return "\n".join([*lines, "---"])


def _architecture(model: VisionTransformer) -> str:
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    tokens = ["class token" if cfg.class_token else "no class token"]
    if cfg.reg_tokens:
        tokens.append(f"{cfg.reg_tokens} register tokens")
    rows = [
        ("variant", variant_name(model)),
        ("parameters", f"{params:,}"),
        (
            "image size",
            f"{cfg.img_size[0]}x{cfg.img_size[1]}" + (" (any size accepted)" if cfg.dynamic_img_size else ""),
        ),
        ("patch size", f"{cfg.patch_size[0]}x{cfg.patch_size[1]}" + (" (conv stem)" if cfg.stem == "conv" else "")),
        ("input channels", str(cfg.in_chans)),
        ("width / depth / heads", f"{cfg.embed_dim} / {cfg.depth} / {cfg.num_heads}"),
        ("MLP ratio", f"{cfg.mlp_ratio:g}"),
        ("tokens", ", ".join(tokens)),
        ("position embedding", cfg.pos_embed + (" (patches only)" if cfg.no_embed_class else "")),
        ("pooling", cfg.global_pool + (" + fc_norm" if cfg.use_fc_norm else "")),
        ("classes", str(cfg.num_classes) if cfg.num_classes else "none (feature extractor)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Architecture\n\n| | |\n| --- | --- |\n{table}"


def _data(model: VisionTransformer, run: RunRecord) -> str:
    lines = []
    tc = run.train_config
    for key, what in (("data", "training data"), ("val_data", "validation data"), ("model", "started from")):
        if tc.get(key):
            lines.append(f"- {what}: `{tc[key]}`")
    if tc.get("val_split") and not tc.get("val_data"):
        lines.append(f"- validation: {tc['val_split']:g} of the training data, held out")
    for key, what in (("finetuned_from", "fine-tuned from"), ("converted_from", "converted from")):
        if run.provenance.get(key):
            lines.append(f"- {what}: `{run.provenance[key]}`")
    if model.labels:
        shown = ", ".join(model.labels[:_SHOWN_CLASSES])
        more = f", ... ({len(model.labels)} in all)" if len(model.labels) > _SHOWN_CLASSES else ""
        lines.append(f"- classes: {shown}{more}")
    if not lines:
        lines.append("Not recorded with this checkpoint.")
    return "## Data\n\n" + "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def _metrics(run: RunRecord) -> str:
    out = ["## Metrics"]
    final = run.final
    if final:
        shown = {
            k: final[k] for k in ("val_top1", "val_top5", "val_loss", "epoch", "step", "train_seconds") if k in final
        }
        if "best_weights" in final:
            shown["weights"] = final["best_weights"]
        out.append("Final evaluation (from the run's metrics.jsonl):\n")
        out.append("| " + " | ".join(shown) + " |\n|" + " --- |" * len(shown))
        out.append("| " + " | ".join(_fmt(v) for v in shown.values()) + " |")
    elif "val_top1" in run.provenance:
        extra = {k: run.provenance[k] for k in ("val_top5", "steps", "weights") if k in run.provenance}
        out.append(f"Validation top-1 {run.provenance['val_top1']} (checkpoint metadata; {extra or 'no more'}).")
    evaluations = [e for e in run.evaluations if "val_top1" in e][-_SHOWN_EVALUATIONS:]
    if evaluations:
        out.append("\nEvaluations during training (last shown):\n")
        out.append("| step | epoch | train_loss | val_top1 | val_top5 | val_loss |\n|" + " --- |" * 6)
        for e in evaluations:
            keys = ("step", "epoch", "train_loss", "val_top1", "val_top5", "val_loss")
            out.append("| " + " | ".join(_fmt(e.get(k)) for k in keys) + " |")
    if len(out) == 1:
        out.append("No evaluation was recorded with this checkpoint.")
    return "\n".join(out if len(out) == 1 else [out[0], "", *out[1:]])


def _preprocessing(model: VisionTransformer) -> str:
    pre = model.preprocess
    H, W = pre.input_size
    resize = (
        f"shorter side to {math.floor(H / pre.crop_pct)} px"
        if H == W
        else f"to {math.floor(H / pre.crop_pct)}x{math.floor(W / pre.crop_pct)} px"
    )
    return (
        "## Preprocessing\n\n"
        f"Resize ({pre.interpolation}) the {resize}, center-crop {H}x{W}, scale to [0, 1], then normalise with "
        f"mean {list(pre.mean)} and std {list(pre.std)}. The saved files carry this for each library that reads them."
    )


def _usage(model: VisionTransformer, fmt: str, where: str, hub: bool) -> str:
    headless = model.cfg.num_classes == 0
    blocks = [
        "```python\nimport vitkit\n\n"
        f'model = vitkit.from_pretrained("{where}")\n'
        + (
            "features = model(images)  # (B, D)\n```"
            if headless
            else 'print(vitkit.Predictor(model).predict_one("img.jpg"))\n```'
        )
    ]
    if fmt == "timm":
        prefix = "hf-hub:" if hub else "local-dir:"
        blocks.append(f'```python\nimport timm\n\nmodel = timm.create_model("{prefix}{where}", pretrained=True)\n```')
    if fmt == "hf":
        cls, kw = ("ViTModel", ", add_pooling_layer=False") if headless else ("ViTForImageClassification", "")
        blocks.append(
            f"```python\nfrom transformers import AutoImageProcessor, {cls}\n\n"
            f'processor = AutoImageProcessor.from_pretrained("{where}")\n'
            f'model = {cls}.from_pretrained("{where}"{kw})\n```'
        )
    return "## How to load\n\n" + "\n\n".join(blocks)


def model_card(
    model: VisionTransformer,
    fmt: str,
    where: str,
    source: str | Path | None = None,
    hub: bool = False,
    license: str | None = None,
    provenance: dict[str, str] | None = None,
) -> str:
    """README.md text for `model` saved in `fmt` at `where` (a folder, or a repo id when `hub`).

    provenance: what the caller knows beyond the source's own metadata (e.g. converted_from); it wins.
    """
    title = Path(where).name if not hub else where.split("/")[-1]
    classes = f"{model.cfg.num_classes}-class image classifier" if model.cfg.num_classes else "image feature extractor"
    run = read_run_record(source)
    run.provenance.update(provenance or {})
    intro = (
        f"# {title}\n\nA Vision Transformer ({variant_name(model)}) {classes}, saved by vitkit {__version__} "
        f"as {FORMAT_NAMES[fmt]}."
    )
    sections = [
        _front_matter(model, fmt, license),
        intro,
        _architecture(model),
        _data(model, run),
        _metrics(run),
        _preprocessing(model),
        _usage(model, fmt, where, hub),
    ]
    return "\n\n".join(sections) + "\n"


__all__ = ["README", "RunRecord", "read_run_record", "variant_name", "model_card"]
