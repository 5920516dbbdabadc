"""PretrainConfig: a training run's options plus the masked autoencoder's, each defined once with `option(...)`.

`vitkit pretrain`'s flags are generated from these declarations (vitkit/train/options.py), as `vitkit train`'s
are from TrainConfig; a resume accepts the changes marked `resumable`. Where pretraining's defaults differ from
classification's, the field is declared again here with MAE's choice (He et al. 2021, "Masked Autoencoders Are
Scalable Vision Learners", Table 8 / A.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..train.recipe import TrainConfig, option

METHODS = ("mae",)


@dataclass
class PretrainConfig(TrainConfig):
    """A pretraining run: the images of `data` without their labels, the encoder saved as `out/model.safetensors`."""

    data: str = option(
        "",
        help="image folder (class folders or none at all), .tar/.tar.gz, .csv (path,label), digits, cifar10 or "
        "cifar100; labels are not used",
    )
    val_split: float = option(
        0.05,
        help="fraction of --data held out to measure the reconstruction loss on (0: none)",
        exclusive="validation",
    )
    out: str = option("runs/pretrain", help="run folder: checkpoints, metrics.jsonl, model.safetensors", resumable=True)
    # MAE's AdamW: a shorter memory of the second moment than classification's 0.999
    betas: tuple[float, float] = option((0.9, 0.95), help="AdamW betas", nargs="2", metavar="B")
    method: str = option("mae", help="pretraining objective", choices=METHODS)
    mask_ratio: float = option(0.75, help="fraction of the patches hidden from the encoder")
    decoder_dim: int = option(128, help="width of the decoder that paints the hidden patches (divisible by 4)")
    decoder_depth: int = option(2, help="transformer blocks in the decoder")
    decoder_heads: int = option(4, help="attention heads in the decoder")
    norm_pix_loss: bool = option(
        True, help="predict each patch's pixels normalised by the patch's own mean and std (MAE's better target)"
    )
    recon_every: int = option(
        1, help="draw reconstruction.png every N epochs (and always at the end; 0: only at the end)", resumable=True
    )
    # resumable: the k-NN reads the encoder and draws nothing from the RNGs a resumed run depends on
    knn_every: int = option(
        0,
        help="k-NN accuracy (cosine, k=20) of the encoder's frozen features every N epochs, logged as `knn` "
        "records (0: off; docs/training.md)",
        resumable=True,
    )
    knn_data: str | None = option(
        None, help="labelled images for --knn-every (default: --data, when it has class folders)", resumable=True
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be between 0 and 1 (exclusive), got {self.mask_ratio}")
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim {self.decoder_dim} must be divisible by 4 (its sin-cos position embedding) and by "
                f"decoder_heads {self.decoder_heads}"
            )
        if self.decoder_depth < 1:
            raise ValueError(f"decoder_depth must be at least 1, got {self.decoder_depth}")
        if self.ema_decay > 0:
            raise ValueError("--ema-decay is not supported in pretraining (the encoder is saved as trained)")
        if self.fsdp:
            raise ValueError("--fsdp is not supported in pretraining yet; use plain torchrun (DDP)")
        if self.augment.mixes:
            raise ValueError("MixUp / CutMix blend images, which a reconstruction target cannot use; drop them")


# Training options that `vitkit pretrain` does not offer: whatever is about labels (tasks, their losses, class
# weights and sampling, label subsets, mixing, smoothing), weight averaging and sharding (refused above), and
# layer-wise lr decay (a fine-tuning choice).
NOT_FOR_PRETRAINING = (
    "task",
    "loss",
    "class_weights",
    "sampler",
    "threshold",
    "labels_fraction",
    "ema_decay",
    "fsdp",
    "layer_decay",
    "augment.mixup_alpha",
    "augment.cutmix_alpha",
    "augment.label_smoothing",
)
