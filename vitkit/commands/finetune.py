"""vitkit finetune: parse the flags and call `vitkit.train.finetune()` (full fine-tuning or a linear probe)."""

from __future__ import annotations

import argparse

from .convert import overrides_from_args

HELP = "fine-tune a pretrained ViT (vitkit/timm/HF/torchvision/.npz) on new data: new head, layer decay, or probe"


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
    from ..train.finetune import finetune

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
