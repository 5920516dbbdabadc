"""Training: `fit(TrainConfig)` runs a whole job; loop.py holds the plain `train_one_epoch()` and `evaluate()`;
`finetune()` adapts a pretrained ViT to new data (a new head, then `fit`, or a linear probe).

Pieces, one job each: recipe (TrainConfig: every option defined once, YAML recipes), options (the CLI flags
generated from it), build (a run's data, model and loaders), optim (AdamW param groups, layer-wise lr decay),
schedule (warmup + cosine), ema, checkpoint (atomic, exact resume), logging (bar, JSONL, TensorBoard), plot,
distributed.
"""

from .finetune import FinetuneResult, finetune
from .fit import FitResult, fit
from .recipe import TrainConfig, build_config, load_recipe

__all__ = ["fit", "FitResult", "finetune", "FinetuneResult", "TrainConfig", "build_config", "load_recipe"]
