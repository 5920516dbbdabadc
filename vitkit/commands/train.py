"""vitkit train: train a ViT on your images (folder, .tar(.gz), .csv, digits, cifar10/100) with a modern recipe."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "train a ViT on an image folder / archive / CSV / built-in set; resumable, logged, budgeted"


def _pair(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,M (ops,magnitude), e.g. 2,9; got {text!r}") from None
    return n, m


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="image folder, .tar/.tar.gz, .csv (path,label), digits, cifar10 or cifar100")
    p.add_argument(
        "--model",
        help="preset / timm / big_vision name or a .safetensors to fine-tune "
        "(default: a small preset for the data's image size)",
    )
    p.add_argument("--recipe", help="YAML recipe (a path or a name from vitkit/recipes); flags override it")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="train this many epochs (default 10)")
    length.add_argument("--minutes", type=float, help="wall-clock budget: the schedule is fitted to it")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, model.safetensors (default runs/train)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out (automatic when --out holds last.ckpt)",
    )
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-split", type=float, help="stratified fraction held out for validation (default 0.1)")
    val.add_argument("--val-data", help="a separate validation source (same classes)")
    p.add_argument("--image-size", type=int, help="resize images to this size when loading")
    p.add_argument("--cache-dir", help="where decoded images are cached (default ~/.cache/vitkit)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (after warmup)")
    p.add_argument("--min-lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay (fine-tuning), e.g. 0.75")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--ema-decay", type=float, help="EMA of the weights (e.g. 0.999); 0 = off")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--clip-grad", type=float, help="max gradient norm; 0 = off")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="bf16 autocast (default) or fp32")
    p.add_argument("--seed", type=int)
    p.add_argument("--drop-path", type=float, help="stochastic depth rate of the model")
    p.add_argument("--stem", choices=("patch", "conv"), help="patch tokenizer: one strided conv, or a conv stack")
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--mixup", type=float, help="MixUp alpha (0 = off)")
    aug.add_argument("--cutmix", type=float, help="CutMix alpha (0 = off)")
    aug.add_argument("--randaugment", type=_pair, metavar="N,M", help="RandAugment with N ops of magnitude M")
    aug.add_argument("--auto-augment", choices=("randaugment", "trivialaugment", "autoaugment", "none"))
    aug.add_argument("--random-erasing", type=float, help="probability of erasing a random box")
    aug.add_argument("--crop-pad", type=int, help="pad-and-random-crop by this many pixels (0 = off)")
    aug.add_argument("--rrc", action="store_true", default=None, help="RandomResizedCrop instead of pad-and-crop")
    aug.add_argument("--no-flip", action="store_true", default=None, help="no horizontal flips")
    aug.add_argument("--label-smoothing", type=float)
    p.add_argument("--checkpoint-every", type=int, help="also write last.ckpt every N steps")
    p.add_argument(
        "--checkpoint-seconds",
        type=float,
        help="at an epoch end, write last.ckpt only if the last write is N s old (short epochs on a GPU)",
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        help="stop (with a checkpoint) after N optimizer steps, schedule unchanged: a smoke test, or a pause",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: shard weights/gradients/optimizer with FSDP2 instead of DDP (large models)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the model (first steps wait for the compiler; pays off on GPUs and long runs)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations in backward: less memory, ~30%% more compute",
    )


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the flags describe: defaults < --recipe < flags."""
    from ..train.recipe import build_config

    augment = {
        "mixup_alpha": args.mixup,
        "cutmix_alpha": args.cutmix,
        "random_erasing": args.random_erasing,
        "random_crop_pad": args.crop_pad,
        "random_resized_crop": args.rrc,
        "hflip": False if args.no_flip else None,
        "label_smoothing": args.label_smoothing,
    }
    if args.randaugment:
        augment.update(auto_augment="randaugment", aa_num_ops=args.randaugment[0], aa_magnitude=args.randaugment[1])
    if args.auto_augment:
        augment["auto_augment"] = None if args.auto_augment == "none" else args.auto_augment
    model_kwargs = {k: v for k, v in (("drop_path_rate", args.drop_path), ("stem", args.stem)) if v is not None}
    return build_config(
        args.recipe,
        data=args.data,
        model=args.model,
        epochs=args.epochs,
        minutes=args.minutes,
        out=args.out,
        val_split=args.val_split,
        val_data=args.val_data,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        warmup_epochs=args.warmup_epochs,
        ema_decay=args.ema_decay,
        grad_accum=args.grad_accum,
        clip_grad=(None if args.clip_grad == 0 else args.clip_grad) if args.clip_grad is not None else None,
        precision=args.precision,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        stop_after_steps=args.stop_after_steps,
        threads=args.threads,
        fsdp=args.fsdp,
        grad_checkpointing=args.grad_checkpointing,
        compile=args.compile,
        progress=False if args.no_progress else None,
        augment=augment,
        model_kwargs=model_kwargs,
    )


def run(args: argparse.Namespace) -> int:
    from ..model.serialization import CheckpointError
    from ..train import fit
    from ..train.loop import TrainingDiverged

    cfg = config_from_args(args)
    if not args.out and args.resume:
        print("vitkit train: --resume continues the run in --out; pass --out RUN_DIR", file=sys.stderr)
        return 2
    try:
        res = fit(cfg, resume=args.resume)
    except (TrainingDiverged, CheckpointError) as e:
        print(f"vitkit train: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if res.model_path is None:
        print(f"checkpoint: {res.checkpoint_path}")
        return 0
    if res.val_top1 is not None:
        print(f"val top-1 {res.val_top1:.2%}, top-5 {res.val_top5:.2%} ({res.best_weights} weights)")
    print(f"metrics: {res.out_dir / 'metrics.jsonl'} (plot: vitkit plot {res.out_dir})")
    print(f"model: {res.model_path}")
    return 0
