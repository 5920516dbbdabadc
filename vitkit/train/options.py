"""The command-line flags of the training verbs, generated from the option declarations in recipe.py.

`add_training_arguments(parser)` adds one flag per training option: TrainConfig's own fields, and the
augmentation and model options below, which live in the nested `augment` and `model_kwargs` configs. The flag's
type and default come from the dataclass field, its help and spelling from the `Option`. A verb picks what it
exposes with `exclude=`; `overrides_from_args(args)` turns the parsed flags back into `build_config` keywords.
A flag left off the command line overrides nothing, so a recipe's value, else the dataclass default, applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import STEMS, ViTConfig
from ..data.transforms import AUTO_AUGMENTS, AugmentConfig
from .recipe import Option, TrainConfig, build_config, options_of

NESTED_CONFIGS: dict[str, type] = {"augment": AugmentConfig, "model_kwargs": ViTConfig}


def _randaugment(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,M (ops,magnitude), e.g. 2,9; got {text!r}") from None
    return n, m


# The options of the nested configs that have a flag: "config.field" -> Option (type and default: the field's).
NESTED_OPTIONS: dict[str, Option] = {
    "augment.mixup_alpha": Option("MixUp alpha (0: off)", flag="--mixup"),
    "augment.cutmix_alpha": Option("CutMix alpha (0: off)", flag="--cutmix"),
    "augment.auto_augment": Option("automatic augmentation policy", choices=(*AUTO_AUGMENTS, "none")),
    "augment.random_erasing": Option("probability of erasing a random box"),
    "augment.random_crop_pad": Option("pad-and-random-crop by this many pixels (0: off)", flag="--crop-pad"),
    "augment.random_resized_crop": Option("RandomResizedCrop instead of pad-and-crop", flag="--rrc"),
    "augment.hflip": Option("random horizontal flips", flag="--flip"),
    "augment.alternate_flips": Option(
        "instead of random flips, flip each image in every other epoch (airbench's derandomised flip: a seeded coin "
        "per image picks the epochs)"
    ),
    "augment.label_smoothing": Option("label smoothing of the loss"),
    "model_kwargs.drop_path_rate": Option("stochastic depth rate of the model", old=("--drop-path",)),
    "model_kwargs.stem": Option("patch tokenizer: one strided conv, or a conv stack", choices=STEMS),
}


@dataclass(frozen=True)
class Flag:
    """One generated flag: the option it sets (`target`: "lr", "augment.mixup_alpha"), how it parses, its default."""

    target: str
    option: Option
    type: Callable[[str], Any] | None  # None: a switch (--x / --no-x)
    default: Any  # the value when nothing overrides it, shown in --help (None: not shown)
    expand: Callable[[Any], dict[str, Any]] | None = None  # one flag that sets several fields of `target`

    @property
    def name(self) -> str:
        return self.option.flag or "--" + self.target.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


# A shorthand that sets three augmentation fields at once; listed before --auto-augment, which may override it.
RANDAUGMENT = Flag(
    "augment",
    Option("RandAugment with N ops of magnitude M", flag="--randaugment", metavar="N,M"),
    _randaugment,
    None,
    expand=lambda nm: {"auto_augment": "randaugment", "aa_num_ops": nm[0], "aa_magnitude": nm[1]},
)


def _value_type(hint: Any) -> Callable[[str], Any] | None:
    """The type argparse parses for a field typed `hint`: `float | None` -> float, `tuple[int, int]` -> int,
    `bool` -> None (a switch)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return None if hint is bool else hint


def _field_flag(config_class: type, name: str, option: Option, target: str) -> Flag:
    f = next(f for f in dataclasses.fields(config_class) if f.name == name)
    default = None if f.default is dataclasses.MISSING else f.default
    parse = option.parse or _value_type(typing.get_type_hints(config_class)[name])
    return Flag(target, option, parse, default)


def training_flags(config_class: type[TrainConfig] = TrainConfig) -> list[Flag]:
    """Every training option that has a flag, in --help order: the fields of `config_class` (TrainConfig or a
    subclass with more options), then the nested ones."""
    options = options_of(config_class).items()
    flags = [_field_flag(config_class, n, o, n) for n, o in options if o.flag != ""]
    flags.append(RANDAUGMENT)
    for target, option in NESTED_OPTIONS.items():
        config, name = target.split(".")
        flags.append(_field_flag(NESTED_CONFIGS[config], name, option, target))
    return flags


class _OldSpelling(argparse.Action):
    """An earlier spelling of a flag: sets the same value, and says on stderr what the flag is called now."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _help(flag: Flag, shown_default: Any) -> str:
    text = flag.option.help.replace("%", "%%")  # argparse formats help with %
    if shown_default is None or flag.target.startswith("model_kwargs."):  # the model's preset decides those
        return text
    if isinstance(shown_default, bool):
        shown_default = "on" if shown_default else "off"
    elif isinstance(shown_default, tuple):
        shown_default = " ".join(map(str, shown_default))
    return f"{text} (default: {shown_default})" if shown_default != "" else text


def _add_flag(container: Any, parser: argparse.ArgumentParser, flag: Flag, shown_default: Any, required: bool):
    opt = flag.option
    kw: dict[str, Any] = {"dest": flag.dest, "default": None, "help": _help(flag, shown_default)}
    if flag.type is None:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw.update(type=flag.type, required=required)
        kw.update({k: v for k, v in (("choices", opt.choices), ("metavar", opt.metavar)) if v is not None})
        if opt.nargs is not None:
            kw["nargs"] = int(opt.nargs) if opt.nargs.isdigit() else opt.nargs
    container.add_argument(flag.name, **kw)
    for old in opt.old:  # hidden from --help; parses like the new spelling
        old_kw = {k: v for k, v in kw.items() if k not in ("help", "required", "action")}
        parser.add_argument(old, action=_OldSpelling, new=flag.name, help=argparse.SUPPRESS, **old_kw)


def add_training_arguments(
    parser: argparse.ArgumentParser,
    exclude: Collection[str] = (),
    required: Collection[str] = (),
    shown_defaults: Mapping[str, Any] | None = None,
    config_class: type[TrainConfig] = TrainConfig,
) -> None:
    """Add `--recipe` and the flags of every training option but those in `exclude` (targets: "model",
    "model_kwargs.stem"). `required`: targets the verb cannot do without; `shown_defaults`: the verb's own
    defaults where they differ from TrainConfig's (shown in --help only); `config_class`: the verb's options
    (TrainConfig or a subclass)."""
    parser.add_argument("--recipe", help="YAML recipe (a path or a name from vitkit/recipes); flags override it")
    groups: dict[str, Any] = {"augment": parser.add_argument_group("augmentation")}
    shown = dict(shown_defaults or {})
    for flag in training_flags(config_class):
        if flag.target in exclude:
            continue
        container = groups.get(flag.target.split(".")[0], parser)
        if flag.option.exclusive:
            key = f"exclusive:{flag.option.exclusive}"
            if key not in groups:
                groups[key] = container.add_mutually_exclusive_group()
            container = groups[key]
        default = shown.get(flag.target, flag.default)
        _add_flag(container, parser, flag, default, flag.target in required)


def overrides_from_args(args: argparse.Namespace, config_class: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """The `build_config` keywords the given flags set (`augment` and `model_kwargs` as dicts), flags not given
    left out."""
    out: dict[str, Any] = {"augment": {}, "model_kwargs": {}}
    for flag in training_flags(config_class):
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if flag.expand is not None:
            out[flag.target].update(flag.expand(value))
            continue
        config, _, name = flag.target.rpartition(".")
        (out[config] if config else out)[name] = value
    return out


def config_from_args(
    args: argparse.Namespace, config_class: type[TrainConfig] = TrainConfig, **fixed: Any
) -> TrainConfig:
    """The config the flags describe: defaults < --recipe < flags < `fixed` (what the verb decides)."""
    overrides = {**overrides_from_args(args, config_class), **fixed}
    return build_config(getattr(args, "recipe", None), config_class=config_class, **overrides)


__all__ = ["Flag", "training_flags", "add_training_arguments", "overrides_from_args", "config_from_args"]
