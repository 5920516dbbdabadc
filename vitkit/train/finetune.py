"""`finetune()`: adapt a pretrained ViT (any format from_pretrained reads) to new labelled images.

Full fine-tuning: a fresh zero-initialised head, layer-wise lr decay, the position embedding resampled for a
new `img_size`, then the training run of `vitkit train` (`fit()`: augmentation, AdamW, warmup + cosine,
checkpoints, resume, logs). `freeze_backbone=True`: a linear probe, i.e. the encoder's pooled features computed
once and a logistic-regression head fitted on them (L-BFGS), which takes seconds, not epochs.
`vitkit finetune` (vitkit/commands/finetune.py) parses flags and calls this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.sources import load_source, stratified_split, stratified_subset
from ..tasks import task_class
from .fit import fit
from .recipe import build_config, load_recipe

# Where fine-tuning's defaults differ from TrainConfig's, as in MAE's fine-tuning recipe (He et al. 2021, and
# BEiT's before it): a smaller peak lr, layer-wise lr decay (the pretrained lower blocks move least), a warmup over
# 5 % of the steps and drop path 0.1. A recipe or a flag that sets one of them wins. The new head starts at zero
# (`prepare_for_transfer`).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "out": "runs/finetune",
    "lr": 5e-4,
    "layer_decay": 0.75,
    "warmup_fraction": 0.05,
    "model_kwargs.drop_path_rate": 0.1,
}


@dataclass
class FinetuneResult:
    model_path: Path
    val_top1: float | None
    mode: str  # "finetune" or "linear-probe"
    details: dict[str, Any]


def finetune(
    source: str | Path,
    data: str,
    num_classes: int | None = None,
    out: str | Path = FINETUNE_DEFAULTS["out"],
    freeze_backbone: bool = False,
    layer_decay: float | None = FINETUNE_DEFAULTS["layer_decay"],
    img_size: int | tuple[int, int] | None = None,
    strict: bool = True,
    model_overrides: dict[str, Any] | None = None,
    **train_options: Any,
) -> FinetuneResult:
    """Fine-tune `source` on `data` (any `--data` spec of `vitkit train`).

    Args:
        num_classes: must equal the data's class count when given (a check; the data decides).
        layer_decay: per-block lr factor (head at full lr, embeddings at layer_decay ** (depth + 1)); None or 1: off.
        img_size: train at this size (position embedding resampled).
        model_overrides: more from_pretrained overrides (num_heads, drop_path_rate, global_pool ...). `in_chans`
            defaults to the data's channel count: an RGB model fine-tuned on grayscale data becomes a 1-channel
            model (its patch embedding summed over RGB), on 4-channel data a 4-channel one.
        **train_options: TrainConfig fields (epochs, minutes, lr, batch_size, val_split, val_data, seed, ...).
    """
    from ..interop.transfer import prepare_for_transfer  # the interop stack only when fine-tuning

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = train_options.pop("recipe", None)
    model_overrides, train_options = _with_finetune_defaults(recipe, model_overrides or {}, train_options)
    # the data is read as the task reads it (segmentation: images and masks); its classes size the new head
    task = task_class(train_options.get("task") or (load_recipe(recipe).get("task") if recipe else None) or "classify")
    if freeze_backbone and task.name != "classify":
        raise ValueError(f"--freeze-backbone fits a linear classifier on pooled features; not for --task {task.name}")
    reader = task()
    ds = reader.read(data, cache_dir=train_options.get("cache_dir"), progress=train_options.get("progress", True))
    if num_classes is not None and num_classes != len(ds.classes):
        raise ValueError(f"--num-classes {num_classes} but '{data}' has {len(ds.classes)} classes ({ds.classes[:10]})")
    model = prepare_for_transfer(
        source,
        len(ds.classes),
        img_size=img_size,
        freeze_backbone=freeze_backbone,
        labels=list(ds.classes),
        strict=strict,
        **{"in_chans": int(ds.images.shape[3]), **model_overrides},  # the data's channels, unless overridden
    )
    print(model.load_report.summary() if hasattr(model, "load_report") else f"loaded {source}")
    if freeze_backbone:
        return _linear_probe(model, ds, out, train_options)

    init = model.save(out / "init.safetensors", finetuned_from=str(source))  # zero head; fit loads it as is
    cfg = build_config(recipe, data=data, model=str(init), out=str(out), layer_decay=layer_decay, **train_options)
    res = fit(cfg)
    details = {"fit": str(res.out_dir), "val": res.val_summary}  # the task's numbers (segmentation: mIoU)
    return FinetuneResult(res.model_path or res.checkpoint_path, res.val_top1, "finetune", details)


def _with_finetune_defaults(
    recipe: str | Path | None, model_overrides: dict[str, Any], train_options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model overrides, training options) with FINETUNE_DEFAULTS filled in where neither the recipe nor a flag
    sets the option (a warmup set in epochs counts as set)."""
    given = {**(load_recipe(recipe) if recipe else {}), **train_options}
    given.update({f"model_kwargs.{k}": v for k, v in {**given.pop("model_kwargs", {}), **model_overrides}.items()})
    if "warmup_epochs" in given:  # a warmup given in epochs is a warmup chosen
        given.setdefault("warmup_fraction", None)
    missing = {k: v for k, v in FINETUNE_DEFAULTS.items() if k not in given and k not in ("out", "layer_decay")}
    model_defaults = {k.split(".", 1)[1]: v for k, v in missing.items() if k.startswith("model_kwargs.")}
    train_defaults = {k: v for k, v in missing.items() if not k.startswith("model_kwargs.")}
    return {**model_defaults, **model_overrides}, {**train_defaults, **train_options}


def _linear_probe(model: Any, ds: Any, out: Path, opts: dict[str, Any]) -> FinetuneResult:
    """Features once with the eval preprocessing, then an L-BFGS logistic-regression head."""
    from ..infer.embed import embed_array
    from ..interop.transfer import fit_linear_head

    val_ds = ds
    if opts.get("val_data"):  # a separate validation source, mapped onto the training classes
        val_ds = load_source(opts["val_data"], image_size=ds.image_size, classes=ds.classes, progress=False)
        train_idx, val_idx = np.arange(len(ds)), np.arange(len(val_ds))
    else:
        train_idx, val_idx = stratified_split(ds.labels, float(opts.get("val_split", 0.1)), int(opts.get("seed", 0)))
    fraction = float(opts.get("labels_fraction", 1.0))
    train_idx = train_idx[stratified_subset(ds.labels[train_idx], fraction, int(opts.get("seed", 0)))]
    precision = opts.get("precision", "bf16")
    feats = torch.from_numpy(embed_array(model, ds.images[train_idx], precision=precision))  # (N, D)
    labels = torch.from_numpy(np.asarray(ds.labels[train_idx]))
    loss = fit_linear_head(model.head, feats, labels)
    top1 = None
    if len(val_idx):
        val = torch.from_numpy(embed_array(model, val_ds.images[val_idx], precision=precision))
        with torch.no_grad():
            pred = model.head(val).argmax(-1).numpy()
        top1 = float((pred == np.asarray(val_ds.labels[val_idx])).mean())
    for p in model.parameters():
        p.requires_grad = True
    path = model.save(out / "model.safetensors")
    details = {"train_images": int(len(train_idx)), "val_images": int(len(val_idx)), "train_loss": loss}
    (out / "probe.json").write_text(json.dumps({"val_top1": top1, **details}))
    return FinetuneResult(path, top1, "linear-probe", details)


__all__ = ["finetune", "FinetuneResult"]
