"""vitkit finetune: parse the flags and call `vitkit.train.finetune()` (full fine-tuning or a linear probe).

The training flags are the ones `vitkit train` has (generated from the training options, vitkit/train/options.py),
less the model choice (`--from` names it) and with `--img-size` that resamples the pretrained model.
"""

from __future__ import annotations

import argparse

from . import CHECKPOINT_HELP

HELP = "fine-tune a pretrained ViT (vitkit/timm/HF/torchvision/.npz) on new data: new head, layer decay, or probe"
# training options that fine-tuning sets otherwise: the model is --from, its size is --img-size, its stem is fixed
NOT_FOR_FINETUNING = ("model", "image_size", "model_kwargs.stem")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.finetune import FINETUNE_DEFAULTS
    from ..train.options import add_training_arguments
    from .convert import add_override_arguments

    p.add_argument("--from", dest="source", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--freeze-backbone", action="store_true", help="linear probe: train only the new head")
    p.add_argument("--no-strict", action="store_true", help="load a checkpoint that does not fit exactly (reported)")
    add_training_arguments(p, exclude=NOT_FOR_FINETUNING, required=("data",), shown_defaults=FINETUNE_DEFAULTS)
    add_override_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import finetune
    from ..train.options import overrides_from_args
    from .convert import overrides_from_args as model_overrides_from_args

    model_overrides = model_overrides_from_args(args)
    num_classes, img_size = model_overrides.pop("num_classes", None), model_overrides.pop("img_size", None)
    train_options = overrides_from_args(args)
    model_overrides.update(train_options.pop("model_kwargs"))
    if args.recipe:
        train_options["recipe"] = args.recipe
    explicit = {k: train_options.pop(k) for k in ("out", "layer_decay") if k in train_options}
    res = finetune(
        args.source,
        train_options.pop("data"),
        num_classes=num_classes,
        freeze_backbone=args.freeze_backbone,
        img_size=img_size,
        strict=not args.no_strict,
        model_overrides=model_overrides,
        **explicit,
        **train_options,
    )
    if res.val_top1 is None and res.details.get("val"):  # another task's numbers (segmentation: miou, pixel_acc)
        shown = ", ".join(f"{k} {v:.2%}" for k, v in res.details["val"].items())
        print(f"{res.mode}: validation {shown}; model: {res.model_path}")
        return 0
    acc = "n/a" if res.val_top1 is None else f"{res.val_top1:.2%}"
    print(f"{res.mode}: validation top-1 {acc}; model: {res.model_path}")
    return 0
