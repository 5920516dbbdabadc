"""Training: `fit(TrainConfig)` runs a whole job; loop.py holds the plain `train_one_epoch()` and `evaluate()`.

Pieces, one job each: optim (AdamW param groups, layer-wise lr decay), schedule (warmup + cosine), ema,
checkpoint (atomic, exact resume), logging (bar, JSONL, TensorBoard), recipe (YAML + flags), plot, distributed.
"""

from .fit import FitResult, fit
from .recipe import TrainConfig, build_config, load_recipe

__all__ = ["fit", "FitResult", "TrainConfig", "build_config", "load_recipe"]
