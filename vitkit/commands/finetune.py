"""vitkit finetune: adapt a pretrained ViT (any format from_pretrained reads) to new labelled images.

Full fine-tuning: a fresh zero-initialised head, layer-wise lr decay, the position embedding resampled for a
new `--img-size`, then the training run of `vitkit train` (`vitkit.train.fit`: augmentation, AdamW, warmup +
cosine, checkpoints, resume, logs). `--freeze-backbone`: a linear probe, i.e. the encoder's pooled features
computed once and a logistic-regression head fitted on them (L-BFGS), which takes seconds, not epochs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .convert import overrides_from_args

HELP = "fine-tune a pretrained ViT (vitkit/timm/HF/torchvision/.npz) on new data: new head, layer decay, or probe"


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
    out: str | Path = "runs/finetune",
    freeze_backbone: bool = False,
    layer_decay: float | None = 0.75,
    img_size: int | tuple[int, int] | None = None,
    strict: bool = True,
    model_overrides: dict[str, Any] | None = None,
    **train_options: Any,
) -> FinetuneResult:
    """Fine-tune `source` on `data` (any `--data` spec of `vitkit train`).

    Args:
        num_classes: must equal the data's class count when given (a check; the data decides).
        layer_decay: per-block lr factor (head at full lr, embeddings at layer_decay ** (depth + 1)); None: off.
        img_size: train at this size (position embedding resampled).
        model_overrides: more from_pretrained overrides (num_heads, drop_path_rate, global_pool ...).
        **train_options: TrainConfig fields (epochs, minutes, lr, batch_size, val_split, val_data, seed, ...).
    """
    from ..data.sources import load_source
    from ..interop.transfer import prepare_for_transfer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_source(data, cache_dir=train_options.get("cache_dir"), progress=train_options.get("progress", True))
    if num_classes is not None and num_classes != len(ds.classes):
        raise ValueError(f"--num-classes {num_classes} but '{data}' has {len(ds.classes)} classes ({ds.classes[:10]})")
    model = prepare_for_transfer(
        source,
        len(ds.classes),
        img_size=img_size,
        freeze_backbone=freeze_backbone,
        labels=list(ds.classes),
        strict=strict,
        **(model_overrides or {}),
    )
    print(model.load_report.summary() if hasattr(model, "load_report") else f"loaded {source}")
    if freeze_backbone:
        return _linear_probe(model, ds, out, train_options)

    from ..train import build_config, fit

    init = model.save(out / "init.safetensors", finetuned_from=str(source))  # zero head; fit loads it as is
    recipe = train_options.pop("recipe", None)
    defaults = {} if recipe else {"lr": 5e-4}  # fine-tuning wants a smaller peak lr than training from scratch
    cfg = build_config(
        recipe, data=data, model=str(init), out=str(out), layer_decay=layer_decay, **{**defaults, **train_options}
    )
    res = fit(cfg)
    return FinetuneResult(res.model_path or res.checkpoint_path, res.val_top1, "finetune", {"fit": str(res.out_dir)})


def _linear_probe(model: Any, ds: Any, out: Path, opts: dict[str, Any]) -> FinetuneResult:
    """Features once with the eval preprocessing, then an L-BFGS logistic-regression head."""
    import numpy as np
    import torch

    from ..data.sources import stratified_split
    from ..infer.embed import embed_array
    from ..interop.transfer import fit_linear_head

    val_ds = ds
    if opts.get("val_data"):  # a separate validation source, mapped onto the training classes
        from ..data.sources import load_source

        val_ds = load_source(opts["val_data"], image_size=ds.image_size, classes=ds.classes, progress=False)
        train_idx, val_idx = np.arange(len(ds)), np.arange(len(val_ds))
    else:
        train_idx, val_idx = stratified_split(ds.labels, float(opts.get("val_split", 0.1)), int(opts.get("seed", 0)))
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, help="pretrained checkpoint: file or folder, any format")
    p.add_argument("--data", required=True, help="image folder, .tar(.gz), .csv, digits, cifar10, ...")
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--freeze-backbone", action="store_true", help="linear probe: train only the new head")
    p.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (1 = off; default 0.75)")
    p.add_argument("--epochs", type=float, help="epochs of fine-tuning (default 10, or --minutes)")
    p.add_argument("--minutes", type=float, help="wall-clock budget instead of --epochs")
    p.add_argument("--lr", type=float, help="peak learning rate of the head (default 5e-4)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--val-split", type=float, help="held-out fraction of --data (default 0.1)")
    p.add_argument("--val-data", help="a separate validation source")
    p.add_argument("--recipe", help="a training recipe YAML (flags override it)")
    p.add_argument("--drop-path-rate", type=float, help="stochastic depth of the fine-tuned encoder")
    p.add_argument("--precision", choices=["bf16", "fp32"])
    p.add_argument("--seed", type=int)
    p.add_argument("--no-strict", action="store_true", help="load a checkpoint that does not fit exactly (reported)")
    p.add_argument("--no-progress", action="store_true")
    from .convert import add_override_arguments

    add_override_arguments(p)


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    num_classes, img_size = overrides.pop("num_classes", None), overrides.pop("img_size", None)
    if args.drop_path_rate is not None:
        overrides["drop_path_rate"] = args.drop_path_rate
    train_options = {
        k: getattr(args, k)
        for k in ("epochs", "minutes", "lr", "batch_size", "val_split", "val_data", "recipe", "precision", "seed")
        if getattr(args, k) is not None
    }
    if args.no_progress:
        train_options["progress"] = False
    res = finetune(
        args.source,
        args.data,
        num_classes=num_classes,
        out=args.out,
        freeze_backbone=args.freeze_backbone,
        layer_decay=None if args.layer_decay == 1.0 else args.layer_decay,
        img_size=img_size,
        strict=not args.no_strict,
        model_overrides=overrides,
        **train_options,
    )
    acc = "n/a" if res.val_top1 is None else f"{res.val_top1:.2%}"
    print(f"{res.mode}: validation top-1 {acc}; model: {res.model_path}")
    return 0
