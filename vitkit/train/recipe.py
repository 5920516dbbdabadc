"""TrainConfig: every option of a training run, defined once; YAML recipes fill it, CLI flags override them.

Each field is declared with `option(...)`: its type and default (the dataclass), its help text, whether it may
change when a run is resumed, and its command-line spelling. The flags of `vitkit train` and `vitkit finetune`
are generated from these declarations (`vitkit/train/options.py`), and `RESUMABLE` (what a resume may change) is
read from them, so adding an option is one line here.

A recipe is a YAML mapping of TrainConfig fields (`augment:` holds AugmentConfig fields, `model_kwargs:` timm-style
model overrides). Its header comment states the command, the machine, the time and the accuracy it reached, e.g.
`vitkit/recipes/cifar10_budget.yaml`. Precedence: dataclass defaults < recipe < explicit CLI flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.transforms import AugmentConfig
from ..tasks import DEFAULT_TASK, TASKS, task_class
from .progressive import normalise_size_steps, parse_size_step

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class Option:
    """What the command line and a resume need to know about one training option, besides its type and default."""

    help: str
    resumable: bool = False  # may change when a run is resumed: the continuation stays exact
    flag: str | None = None  # command-line spelling when it is not --field-name; "" = no flag
    old: tuple[str, ...] = ()  # earlier spellings, still accepted with a deprecation warning
    choices: tuple[str, ...] | None = None
    exclusive: str | None = None  # options that name the same group exclude each other on the command line
    nargs: str | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # how the flag reads one value, where the field's type cannot say


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **about: Any) -> Any:
    """A TrainConfig field: `default` (or `factory` for mutable ones) plus its `Option` (help, resumable, flag ...)."""
    return field(default=default, default_factory=factory, metadata={"option": Option(**about)})


@dataclass
class TrainConfig:
    """A training run. Counts are per process: with torchrun each rank takes `batch_size` images per step."""

    data: str = option("", help="image folder, .tar/.tar.gz, .csv (path,label), digits, cifar10 or cifar100")
    val_data: str | None = option(None, help="a separate validation source (same classes)", exclusive="validation")
    val_split: float = option(
        0.1, help="stratified fraction of --data held out for validation (0: none)", exclusive="validation"
    )
    labels_fraction: float = option(
        1.0,
        help="train on a seeded stratified subset holding this fraction of the training images, e.g. 0.1 "
        "(few-label experiments without hand-made folders; the validation images stay as they are)",
    )
    image_size: int | tuple[int, int] | None = option(
        None,
        help="train at this size (H [W]): images are resized to it when loading, a fresh model is built for it "
        "and a named --model is resized to it (default: the data's own size, the model's own)",
        flag="--img-size",
        old=("--image-size",),
        nargs="+",
        metavar="PX",
    )
    cache_dir: str | None = option(
        None, help="where decoded images are cached (default ~/.cache/vitkit)", resumable=True
    )
    stream: bool = option(
        False,
        help="decode --data in worker processes as it trains, RandomResizedCrop from the full image, instead of "
        "through the decode cache (automatic for data whose cache would pass $VITKIT_CACHE_LIMIT; docs/streaming.md)",
        exclusive="data_mode",
    )
    cache: bool = option(
        False, help="decode --data once into the cache even when it is large enough to stream", exclusive="data_mode"
    )
    workers: int | None = option(
        None,
        help="decoder processes when streaming (default: $VITKIT_DECODE_WORKERS, else half the cores, 1 to 8)",
        resumable=True,  # the streamed order does not depend on it: a resume may use more or fewer
    )
    out: str = option("runs/train", help="run folder: checkpoints, metrics.jsonl, model.safetensors", resumable=True)
    model: str | None = option(
        None,
        help="preset / timm / big_vision name (random weights), or weights to fine-tune: a checkpoint or a Hub name "
        "(google/vit-base-patch16-224, vit_small_patch16_224.augreg_in21k) "
        "(default: a small preset for the data's image size)",
    )
    model_kwargs: dict[str, Any] = option(
        factory=dict, help="ViTConfig overrides (stem, depth, drop_path_rate ...)", flag=""
    )
    whiten_stem: bool = option(
        False,
        help="a fresh model's conv tokenizer (stem: conv) starts with its first layer set to the whitening filters of "
        "5,000 training images' patches, as airbench does (a resume keeps the weights it has)",
    )
    progressive_sizes: tuple[tuple[float, int], ...] | None = option(
        None,
        help="progressive resizing: from each fraction of the schedule's steps on, train at this side in px, e.g. "
        "0:24 0.5:32 (batches shrunk after augmentation; multiples of the patch size, ending at the model's input "
        "size; evaluation stays at full size; classify only)",
        nargs="+",
        metavar="FRAC:PX",
        parse=parse_size_step,
    )
    epochs: float | None = option(None, help="train this many epochs (default 10)", resumable=True, exclusive="length")
    minutes: float | None = option(
        None, help="wall-clock budget: the schedule is fitted to it", resumable=True, exclusive="length"
    )
    batch_size: int | None = option(
        None,
        help="images per optimizer step, split into --grad-accum micro-batches (default: 128, or for a small data "
        "set the power of two that gives about 50 steps an epoch, at least 16)",
    )
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(1e-3, help="peak learning rate (after warmup)")
    min_lr: float = option(1e-5, help="learning rate at the end of the cosine")
    weight_decay: float = option(0.05, help="AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), help="AdamW betas", nargs="2", metavar="B")
    layer_decay: float | None = option(None, help="layer-wise lr decay for fine-tuning, e.g. 0.75 (1: off)")
    optimizer_impl: str = option("auto", help="AdamW implementation", choices=("auto", "fused", "foreach", "loop"))
    warmup_epochs: float = option(1.0, help="epochs of linear warmup")
    warmup_fraction: float | None = option(
        None,
        help="warmup over this fraction of the run's steps, e.g. 0.05 (instead of --warmup-epochs; a --minutes "
        "budget's too)",
    )
    clip_grad: float | None = option(1.0, help="max global gradient norm (0: off)")
    ema_decay: float = option(0.0, help="EMA of the weights, e.g. 0.999 (0: off)")
    lookahead_every: int = option(
        0,
        help="lookahead (airbench's): every N optimizer steps move a slow copy of the weights toward them and "
        "continue from it, with a decay rising as --lookahead-decay x progress^3; the run ends on the slow copy "
        "(0: off)",
    )
    lookahead_decay: float = option(  # 0.95**5, airbench's, written out so --help shows it plainly
        0.7737809375, help="the lookahead's decay at the end of the schedule"
    )
    precision: str = option("bf16", help="bf16 autocast or fp32", choices=("bf16", "fp32"))
    seed: int = option(0, help="seed of the model's initialisation, the data order and the augmentation")
    augment: AugmentConfig = option(factory=AugmentConfig, help="augmentation (flags in options.py)", flag="")
    task: str = option(
        DEFAULT_TASK,
        help="what the model learns: classify (one class per image), multilabel (--data: a CSV of path,labels "
        "with labels separated by ';', or a folder holding labels.csv), segment (a class per pixel; --data: a "
        "folder of images/ and masks/, a tar of one, or a CSV of image,mask) (docs/tasks.md)",
        choices=tuple(TASKS),
    )
    loss: str | None = option(
        None,
        help="the task's loss: ce (classify); bce or asl, the asymmetric loss (multilabel) (default: ce / bce)",
        choices=("ce", "bce", "asl"),
    )
    class_weights: str | None = option(
        None,
        help="classify: weight each class's loss by N / (K x its images), so rare classes count as much as common "
        "ones (default: all 1)",
        choices=("balanced",),
    )
    sampler: str = option(
        "shuffle",
        help="shuffle: every training image once an epoch; balanced: draw every class equally often (with "
        "replacement), for imbalanced single-label data",
        choices=("shuffle", "balanced"),
    )
    threshold: float = option(
        0.5,
        help="multilabel: a label is predicted when its probability is above this; the model records it (predict "
        "--threshold overrides it)",
        resumable=True,  # only the validation F1 and the recorded threshold change, not a training step
    )
    seg_head: str = option(
        "linear",
        help="segment: the decoder over the patch grids: linear (one linear map per patch token of the last block) "
        "or pyramid (four blocks' grids fused by a small conv decoder) (docs/segmentation.md)",
        choices=("linear", "pyramid"),
    )
    eval_every: int = option(1, help="evaluate every N epochs (and always at the end)", resumable=True)
    checkpoint_every: int = option(
        0, help="also write last.ckpt every N optimizer steps (0: only at epoch ends and the end)", resumable=True
    )
    checkpoint_seconds: float = option(
        0.0,
        help="at an epoch end, write last.ckpt only if the last write is N s old (short epochs on a GPU; "
        "0: every epoch)",
        resumable=True,
    )
    stop_after_steps: int | None = option(
        None,
        help="stop (with a checkpoint) after N optimizer steps, schedule unchanged: a smoke test, or a pause",
        resumable=True,
    )
    max_bad_steps: int = option(5, help="non-finite losses in a row before the run stops", resumable=True)
    log_every: int = option(10, help="steps between `train` records in metrics.jsonl", resumable=True)
    progress: bool = option(True, help="progress bar (--no-progress: logs only)", resumable=True)
    threads: str | int | None = option(
        None,
        help="CPU threads: a number, or auto: every core, without long OpenMP spins while other processes hold "
        "cores (default: auto; docs/speed.md)",
        resumable=True,
    )
    fsdp: bool = option(
        False, help="under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP"
    )
    grad_checkpointing: bool = option(
        False,
        help="recompute block activations in backward: less memory, more compute "
        "(benchmarks/grad_checkpointing_memory.py)",
        resumable=True,  # the same activations, recomputed with the RNG replayed: the continuation stays exact
    )
    compile: bool = option(
        False,
        help="torch.compile the model in place (the first steps wait for the compiler; pays off on GPUs and long "
        "runs: benchmarks/gpu_step_probe.py)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        self.betas = tuple(float(b) for b in self.betas)
        if isinstance(self.image_size, (list, tuple)):  # the CLI and YAML give lists
            self.image_size = int(self.image_size[0]) if len(self.image_size) == 1 else tuple(self.image_size[:2])
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")
        task_class(self.task)  # an unknown task names the known ones
        if self.sampler not in ("shuffle", "balanced"):
            raise ValueError(f"sampler must be shuffle or balanced, got {self.sampler!r}")
        if self.grad_accum < 1 or (self.batch_size is not None and self.batch_size % self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        if self.epochs is not None and self.minutes is not None:
            raise ValueError("give --epochs or --minutes, not both")
        if self.stream and self.cache:
            raise ValueError("give --stream or --cache, not both")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0.0 < self.labels_fraction <= 1.0:
            raise ValueError(f"labels_fraction must be in (0, 1], got {self.labels_fraction}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lookahead_every < 0 or not 0.0 <= self.lookahead_decay <= 1.0:
            raise ValueError(
                f"lookahead_every must be >= 0 and lookahead_decay in [0, 1], got {self.lookahead_every} and "
                f"{self.lookahead_decay}"
            )
        self.progressive_sizes = normalise_size_steps(self.progressive_sizes)
        if self.progressive_sizes and self.task != "classify":
            raise ValueError(
                f"progressive_sizes is for the classify task (a segmentation mask would have to shrink with its "
                f"image); this run's task is {self.task}: drop progressive_sizes"
            )
        if self.lookahead_every and self.fsdp:
            raise ValueError("--lookahead-every is not supported with --fsdp (the slow copy would not be sharded)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def options_of(config_class: type) -> dict[str, Option]:
    """Field name -> Option for the fields of `config_class` declared with `option(...)`."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(config_class) if "option" in f.metadata}


def resumable_options(config_class: type) -> frozenset[str]:
    """The options of `config_class` that may change when a run is resumed (the continuation stays exact)."""
    return frozenset(name for name, opt in options_of(config_class).items() if opt.resumable)


# Options that may change when a run is resumed; any other difference would break the exact continuation.
RESUMABLE: frozenset[str] = resumable_options(TrainConfig)


def merge_resumed(cfg: TrainConfig, stored: TrainConfig, where: Path) -> TrainConfig:
    """The config a resumed run continues with: the stored run's, with the RESUMABLE changes `cfg` asks for.

    Raises:
        ValueError: `cfg` changes an option outside RESUMABLE (unless `cfg.data` is empty: "resume from the run
            folder alone, whatever its settings were").
    """
    mine, theirs = cfg.to_dict(), stored.to_dict()
    resumable = resumable_options(type(cfg))
    clash = {k: (theirs[k], mine[k]) for k in mine if k not in resumable and mine[k] != theirs[k]}
    if clash and cfg.data:
        detail = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in clash.items())
        raise ValueError(
            f"'{where}' belongs to a run with other settings ({detail}); resume with the same settings, "
            "or pass a new --out to start another run"
        )
    changes = {k: mine[k] for k in resumable if mine[k] != theirs[k]}
    if cfg.epochs is None and cfg.minutes is None:  # nothing said: keep the run's own length
        changes.pop("epochs", None), changes.pop("minutes", None)
    return type(cfg).from_dict(dict(theirs, **changes))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe path, or the name of one shipped in vitkit/recipes (with or without `.yaml`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if shipped.is_file():
        return shipped
    have = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"recipe '{name_or_path}' not found; pass a YAML file or one of: {have}")


def load_recipe(name_or_path: str | Path, config_class: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """The mapping in a recipe YAML file (validated against the fields of `config_class`)."""
    path = find_recipe(name_or_path)
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe '{path}' is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"recipe '{path}' must be a mapping of training options, got {type(d).__name__}")
    config_class.from_dict(dict(d, augment=AugmentConfig(**d.get("augment", {}))))  # fail early on unknown keys
    return d


def build_config(
    recipe: str | Path | None = None, *, config_class: type[TrainConfig] = TrainConfig, **overrides: Any
) -> TrainConfig:
    """defaults < recipe < overrides. Overrides that are None are ignored; `augment` overrides merge by key.

    config_class: TrainConfig, or a subclass with more options (vitkit/pretrain's PretrainConfig).
    """
    d: dict[str, Any] = load_recipe(recipe, config_class) if recipe else {}
    aug = dict(d.pop("augment", {}) or {})
    aug.update({k: v for k, v in (overrides.pop("augment", None) or {}).items() if v is not None})
    kwargs = dict(d.pop("model_kwargs", {}) or {})
    kwargs.update(overrides.pop("model_kwargs", None) or {})
    d.update({k: v for k, v in overrides.items() if v is not None})
    if "epochs" in overrides and overrides["epochs"] is not None:
        d.pop("minutes", None)  # a flag picks the stopping rule: --epochs beats a recipe's minutes ...
    if "minutes" in overrides and overrides["minutes"] is not None:
        d.pop("epochs", None)  # ... and --minutes beats a recipe's epochs
    return config_class.from_dict(dict(d, augment=AugmentConfig(**aug), model_kwargs=kwargs))
