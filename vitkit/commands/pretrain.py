"""vitkit pretrain: learn an encoder from images alone (masked autoencoder), to fine-tune on few labels later.

The flags are generated from the pretraining options (vitkit/pretrain/config.py, vitkit/train/options.py): the
training flags `vitkit train` has, less those about labels, plus the masked autoencoder's (docs/pretraining.md).
"""

from __future__ import annotations

import argparse

HELP = "pretrain a ViT on images without labels as a masked autoencoder (MAE): an encoder for finetune --from"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..pretrain.config import NOT_FOR_PRETRAINING, PretrainConfig
    from ..train.options import add_training_arguments
    from . import add_resume_argument

    add_training_arguments(p, exclude=NOT_FOR_PRETRAINING, required=("data",), config_class=PretrainConfig)
    add_resume_argument(p)


def run(args: argparse.Namespace) -> int:
    from ..pretrain import PretrainConfig, pretrain
    from ..train.options import config_from_args
    from . import run_training_job

    cfg = config_from_args(args, PretrainConfig)
    res = run_training_job("pretrain", lambda: pretrain(cfg, resume=args.resume))
    if isinstance(res, int):
        return res
    if res.val_raw is not None:
        print(f"validation reconstruction loss {res.val_raw['loss']:.4f} (masked patches)")
    print(f"reconstructions: {res.out_dir / 'reconstruction.png'} (metrics: vitkit plot {res.out_dir})")
    print(f"encoder: {res.model_path} (next: vitkit finetune --from {res.model_path} --data LABELLED)")
    return 0
