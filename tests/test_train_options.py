"""The training options are defined once (TrainConfig's fields, vitkit/train/recipe.py): the flags of `vitkit train`
and `vitkit finetune` come from them, old spellings still parse with a warning, the resumable set is read from
them; and a data set smaller than one batch trains with the batch lowered."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit.cli import build_parser, main
from vitkit.train.build import build_model, default_batch_size, micro_batch
from vitkit.train.distributed import DistEnv
from vitkit.train.options import config_from_args, training_flags
from vitkit.train.recipe import RESUMABLE, TrainConfig, merge_resumed, options_of


def parse(*argv: str):
    return build_parser().parse_args([str(a) for a in argv])


def subparser(verb: str):
    return next(a for a in build_parser()._actions if a.dest == "verb").choices[verb]


def flags_of(verb: str) -> set[str]:
    """Every option string the verb's parser accepts, hidden ones included."""
    return {s for action in subparser(verb)._actions for s in action.option_strings}


def changed_value(name: str):
    """A value for TrainConfig field `name` other than its default, as a command line would give it."""
    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
    hint = typing.get_type_hints(TrainConfig)[name]
    special = {"image_size": ["12"], "betas": ["0.8", "0.95"], "data": ["digits"], "optimizer_impl": ["foreach"]}
    # fractions and decays: twice the default is no value
    special.update(labels_fraction=["0.5"], warmup_fraction=["0.05"], lookahead_decay=["0.5"])
    special.update(progressive_sizes=["0:16", "0.5:32"])  # FRAC:PX steps, not a number
    if name in special:
        return special[name]
    choices = options_of(TrainConfig)[name].choices
    if choices:  # a choice other than the default (task, loss, sampler ...)
        return [next(c for c in choices if c != default)]
    if name == "precision":
        return ["fp32"]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is bool:
        return []  # a switch: --x or --no-x, picked by the caller
    if base is str:
        return ["something"]
    return [str(base(7) if default in (None, 0, 0.0) else base(default) * 2)]


def test_every_option_has_a_train_flag_that_sets_it():
    for name, option in options_of(TrainConfig).items():
        if option.flag == "":  # the nested configs: their fields have flags of their own (below)
            continue
        flag = option.flag or "--" + name.replace("_", "-")
        default = getattr(TrainConfig(), name)
        if isinstance(default, bool):
            argv = [flag if not default else "--no-" + flag[2:]]
        else:
            argv = [flag, *changed_value(name)]
        if name == "minutes":  # --epochs and --minutes exclude each other; the default run has neither
            argv = ["--minutes", "3"]
        cfg = config_from_args(parse("train", *argv))
        assert getattr(cfg, name) != default, f"{argv} did not change {name}"


def test_nested_flags_set_augment_and_model_fields():
    args = parse("train", "--mixup", "0.2", "--randaugment", "3,7", "--no-flip", "--crop-pad", "2", "--stem", "conv")
    cfg = config_from_args(args)
    aug = cfg.augment
    assert aug.mixup_alpha == 0.2 and aug.hflip is False and aug.random_crop_pad == 2
    assert (aug.auto_augment, aug.aa_num_ops, aug.aa_magnitude) == ("randaugment", 3, 7)
    assert cfg.model_kwargs == {"stem": "conv"}
    assert (
        config_from_args(parse("train", "--randaugment", "2,9", "--auto-augment", "none")).augment.auto_augment is None
    )


def test_flags_not_given_leave_the_recipe_and_the_defaults():
    cfg = config_from_args(parse("train", "--recipe", "cifar10_budget", "--lr", "0.01"))
    assert cfg.lr == 0.01 and cfg.minutes == 10 and cfg.ema_decay == 0.998  # the recipe's, but --lr
    assert cfg.augment.label_smoothing == 0.2 and cfg.model_kwargs["stem"] == "conv"
    assert config_from_args(parse("train")) == TrainConfig()
    assert config_from_args(parse("train", "--clip-grad", "0")).clip_grad == 0  # off (it used to be ignored)


def test_one_spelling_per_meaning_across_verbs():
    train, finetune = flags_of("train"), flags_of("finetune")
    for flag in ("--drop-path-rate", "--img-size", "--epochs", "--lr", "--mixup", "--batch-size", "--no-progress"):
        assert flag in train and flag in finetune, flag
    generated = {f.name for f in training_flags()}
    assert "--model" in train and "--model" not in finetune  # fine-tuning names its model with --from
    assert {"--stem"} <= generated and "--stem" not in finetune


@pytest.mark.parametrize(
    ("old", "new", "value", "read"),
    [
        ("--drop-path", "--drop-path-rate", "0.2", lambda cfg: cfg.model_kwargs["drop_path_rate"]),
        ("--image-size", "--img-size", "12", lambda cfg: cfg.image_size),
    ],
)
def test_old_spellings_still_work_with_a_deprecation_warning(capsys, old, new, value, read):
    cfg = config_from_args(parse("train", old, value))
    err = capsys.readouterr().err
    assert read(cfg) == float(value) and f"warning: {old} is deprecated; use {new}" in err
    assert read(config_from_args(parse("train", new, value))) == float(value)
    assert "deprecated" not in capsys.readouterr().err  # the current spelling says nothing
    assert f"{old} " not in subparser("train").format_help()  # hidden from --help


def test_exclusive_options_refuse_each_other():
    with pytest.raises(SystemExit):
        parse("train", "--epochs", "1", "--minutes", "2")
    with pytest.raises(SystemExit):
        parse("finetune", "--from", "x", "--data", "y", "--val-split", "0.1", "--val-data", "z")
    with pytest.raises(SystemExit):
        parse("finetune", "--from", "x")  # --data is required there


def test_finetune_help_shows_its_own_defaults():
    text = " ".join(subparser("finetune").format_help().split())
    assert "(default: 0.75)" in text and "(default: runs/finetune)" in text


# one change per resumable option, as a resumed command line could ask for it
RESUMABLE_CHANGES = {
    "epochs": {"epochs": 3.0},
    "minutes": {"epochs": None, "minutes": 5.0},
    "out": {"out": "elsewhere"},
    "stop_after_steps": {"stop_after_steps": 5},
    "progress": {"progress": False},
    "checkpoint_every": {"checkpoint_every": 10},
    "checkpoint_seconds": {"checkpoint_seconds": 60.0},
    "log_every": {"log_every": 20},
    "eval_every": {"eval_every": 2},
    "cache_dir": {"cache_dir": "other-cache"},
    "workers": {"workers": 2},
    "threads": {"threads": 2},
    "max_bad_steps": {"max_bad_steps": 9},
    "grad_checkpointing": {"grad_checkpointing": True},
    "threshold": {"threshold": 0.7},
}


def test_resumable_set_is_read_from_the_table():
    assert RESUMABLE == {name for name, option in options_of(TrainConfig).items() if option.resumable}
    assert RESUMABLE == set(RESUMABLE_CHANGES)  # the same options as before the table
    stored = TrainConfig(data="digits", epochs=2)
    for name, change in RESUMABLE_CHANGES.items():  # each may change on resume ...
        merged = merge_resumed(dataclasses.replace(stored, **change), stored, Path("last.ckpt"))
        assert all(getattr(merged, k) == v for k, v in change.items()), name
    with pytest.raises(ValueError, match="other settings .*lr"):  # ... the others may not
        merge_resumed(dataclasses.replace(stored, lr=0.5), stored, Path("last.ckpt"))


def test_a_named_model_is_built_at_img_size():
    from vitkit.data.sources import ImageArrayDataset

    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    ds = ImageArrayDataset(images, np.array([0, 1, 0, 1]), ["a", "b"], source="memory")
    cfg = TrainConfig(model="vit_digits_patch2_8", image_size=12, model_kwargs=dict(embed_dim=16, depth=1))
    assert build_model(cfg, ds, np.arange(4)).cfg.img_size == (12, 12)


# ------------------------------------------------------------------------------------ batch larger than the data
class _Data:
    def __init__(self, n: int):
        self.train_idx = np.arange(n)
        self.ds = type("DS", (), {"source": "tiny"})()


@pytest.mark.parametrize(
    ("n", "batch", "accum", "ranks", "micro"),
    [(500, 128, 1, 1, 128), (500, 128, 4, 1, 32), (27, 128, 1, 1, 27), (27, 128, 4, 1, 6), (27, 128, 2, 2, 6)],
)
def test_micro_batch_lowered_to_fit_the_data(capsys, n, batch, accum, ranks, micro):
    cfg = TrainConfig(batch_size=batch, grad_accum=accum)
    assert micro_batch(cfg, _Data(n), DistEnv(world_size=ranks)) == micro
    err = capsys.readouterr().err
    assert ("lowered to" in err) == (n < batch * ranks)
    assert len(err.splitlines()) == (1 if n < batch * ranks else 0)  # one line


@pytest.mark.parametrize(
    ("n", "accum", "batch"),
    [(45_000, 1, 128), (6_400, 1, 128), (6_399, 1, 64), (1_618, 1, 32), (100, 1, 16), (1_618, 3, 30)],
)
def test_default_batch_size_follows_the_data_size(n, accum, batch):
    assert default_batch_size(n, accum) == batch
    assert micro_batch(TrainConfig(grad_accum=accum), _Data(n), DistEnv()) == batch // accum


def test_data_too_small_for_one_step_is_refused():
    with pytest.raises(ValueError, match="cannot fill one step"):
        micro_batch(TrainConfig(batch_size=128, grad_accum=4), _Data(3), DistEnv())


def tiny_folder(root: Path, n_per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["r", "g", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 90, (8, 8, 3), dtype=np.uint8)
            img[..., c] += 150
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_train_and_finetune_on_30_images_lower_the_batch(tmp_path, capsys):
    data = tiny_folder(tmp_path / "imgs")  # 30 images; 27 after the validation split, batch 128 asked for
    common = ["--data", data, "--epochs", "1", "--cache-dir", tmp_path / "cache", "--no-progress", "--threads", "1"]
    common += ["--batch-size", "128"]
    small = ["--model", "vit_digits_patch2_8", "--img-size", "8", "--no-flip"]
    assert main([str(a) for a in ["train", *common, *small, "--out", tmp_path / "train"]]) == 0
    err = capsys.readouterr().err
    assert "27 training images are fewer than one batch (128); the batch size is lowered to 27" in err
    assert (tmp_path / "train" / "model.safetensors").is_file()

    src = vitkit.create_model("vit_digits_patch2_8", img_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=5)
    src.labels = list("abcde")
    path = src.save(tmp_path / "src.safetensors")
    assert main([str(a) for a in ["finetune", "--from", path, *common, "--out", tmp_path / "ft"]]) == 0
    assert "the batch size is lowered to 27" in capsys.readouterr().err
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_other_verbs_do_not_build_the_training_flags():
    """`vitkit VERB` adds that verb's flags alone: the training flags' imports stay out of predict, serve, ..."""
    code = (
        "import sys\nfrom vitkit.cli import build_parser\n"
        "build_parser(only='predict').parse_args(['predict', 'm', 'x'])\n"
        "print('vitkit.train.options' in sys.modules, 'vitkit.data.transforms' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.slow
def test_default_recipe_on_digits_comes_within_three_points_of_the_demo(tmp_path):
    """`vitkit train --data digits --epochs 20` with every other option at its default (the demo reaches ~95.8 %)."""
    from vitkit.train import fit

    res = fit(TrainConfig(data="digits", epochs=20, out=str(tmp_path), progress=False), resume=False)
    assert res.val_top1 >= 0.928
