"""Pretraining without labels: a masked autoencoder (MAE) learns the images, and its encoder becomes a vitkit model.

    mae.py        masking, the decoder, the loss: the objective (`MaskedAutoencoder`)
    config.py     PretrainConfig: TrainConfig's options plus the masked autoencoder's (`vitkit pretrain`'s flags)
    run.py        `pretrain(cfg)`: a `TrainingRun` (vitkit/train) that trains encoder + decoder
    visualise.py  reconstruction.png: original / masked / reconstructed images of a fixed set

Imports flow one way: pretrain uses train (its loop, budget, checkpoints, resume, logs), never the reverse.
"""

from .config import PretrainConfig
from .mae import MaskedAutoencoder
from .run import PretrainingRun, pretrain

__all__ = ["pretrain", "PretrainConfig", "PretrainingRun", "MaskedAutoencoder"]
