"""Training pieces: schedule, param groups, EMA, checkpoints, non-finite hook, recipes (each well under a second)."""

import math
import os

import pytest
import torch

import vitkit
from vitkit.model.serialization import CheckpointError
from vitkit.train.checkpoint import load_checkpoint, save_checkpoint
from vitkit.train.ema import ModelEma
from vitkit.train.loop import EpochHooks, StepState, TrainingDiverged, train_one_epoch
from vitkit.train.optim import build_optimizer, layer_decay_param_groups, param_groups
from vitkit.train.recipe import TrainConfig, build_config, load_recipe
from vitkit.train.schedule import WarmupCosine, apply_lr

from .conftest import tiny_kwargs


def test_warmup_cosine_values():
    s = WarmupCosine(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s.lr_at(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert s.lr_at(4) == pytest.approx(0.5)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert s.lr_at(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # half way: mid value
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup
    s.relayout(20)  # budget re-estimate before the cosine starts: warmup capped at a quarter
    assert (s.total_steps, s.warmup_steps) == (20, 5)
    s = WarmupCosine(base_lr=1.0, total_steps=110, warmup_steps=10)
    before = s.lr_at(50)
    s.relayout(200, at_step=50)  # mid-cosine: the curve continues from the same lr, then ends at step 200
    assert s.lr_at(50) == pytest.approx(before) and s.lr_at(51) < before
    assert s.lr_at(200) == pytest.approx(0.0) and s.lr_at(125) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (0.4 + 0.3)))
    )


def test_param_groups_split_decay():
    m = vitkit.create_model("vit_cifar_patch4_32", **tiny_kwargs(reg_tokens=2, init_values=1e-5, stem="conv"))
    groups = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight", "patch_embed.proj.weight"} <= decay
    assert {
        "cls_token",
        "reg_token",
        "pos_embed",
        "norm.weight",
        "norm.bias",
        "blocks.0.ls1.gamma",
        "blocks.0.attn.qkv.bias",
        "blocks.0.norm1.weight",
        "head.bias",
    } <= no_decay
    assert not any(".bias" in n or "norm" in n for n in decay)
    assert decay | no_decay == {n for n, _ in m.named_parameters()}
    opt = build_optimizer(m, 1e-3, 0.05, impl="fused")
    assert opt.defaults["fused"]


def test_layer_decay_scales():
    m = vitkit.create_model("vit_cifar_patch4_32", **tiny_kwargs(depth=3))
    groups = layer_decay_param_groups(m, 0.05, layer_decay=0.5)
    scale = {}
    names = {id(p): n for n, p in m.named_parameters()}
    for g in groups:
        for p in g["params"]:
            scale[names[id(p)]] = g["lr_scale"]
            assert g["weight_decay"] == (0.05 if p.ndim >= 2 and names[id(p)] not in m.no_weight_decay() else 0.0)
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["blocks.2.mlp.fc1.weight"] == 0.5 and scale["blocks.0.attn.qkv.weight"] == 0.125
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.0625
    opt = torch.optim.AdamW(groups, lr=1.0)
    apply_lr(opt, 0.1)
    assert sorted({round(g["lr"], 6) for g in opt.param_groups}) == [0.00625, 0.0125, 0.025, 0.05, 0.1]


def test_ema_update_math():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(m, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.train()
    m(torch.randn(4, 3))  # moves BatchNorm's running stats and its integer counter
    ema.update(m, step=0)
    for k, v in ema.state_dict().items():
        new = m.state_dict()[k]
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * new)
        else:
            assert torch.equal(v, new)
    warm = ModelEma(m, decay=0.999)
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10**6) == 0.999
    assert all(not p.requires_grad for p in warm.module.parameters())


def test_checkpoint_atomic_no_temp_files_and_corrupt_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    state = {
        "model": {"w": torch.arange(4.0)},
        "optimizer": {},
        "schedule": {},
        "step": 3,
        "epoch": 0,
        "config": {"a": (1, 2)},
        "model_meta": {},
    }
    save_checkpoint(path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(4.0))

    # a write that fails half-way (disk full at fsync) leaves the previous checkpoint intact and no temp file
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(path, dict(state, step=4))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert load_checkpoint(path)["step"] == 3

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a readable vitkit training checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        load_checkpoint(path)


def test_nonfinite_loss_skips_then_stops():
    m = vitkit.create_model("vit_cifar_patch4_32", **tiny_kwargs(num_classes=3))
    opt = build_optimizer(m, 1e-3, 0.05)
    sched = WarmupCosine(1e-3, 10)
    good = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    bad = (torch.full((4, 3, 32, 32), float("nan")), good[1])
    state = StepState()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.warns(UserWarning, match="non-finite"):
        train_one_epoch(m, [bad], opt, sched, state, device=torch.device("cpu"), max_bad_steps=3)
    assert state.step == 0 and state.bad_streak == 1
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the bad step changed nothing
    train_one_epoch(m, [good], opt, sched, state, device=torch.device("cpu"), max_bad_steps=3)
    assert state.step == 1 and state.bad_streak == 0
    with pytest.warns(UserWarning), pytest.raises(TrainingDiverged, match="NaN/Inf for 3 steps"):
        train_one_epoch(m, [bad] * 5, opt, sched, state, device=torch.device("cpu"), max_bad_steps=3)


def test_device_guard_skips_on_the_device_and_stops_late():
    """The GPU guard (forced here on the CPU, where fused AdamW takes found_inf too): a bad step changes no weight
    and no optimizer state but advances the step counter; a streak of bad steps stops the run at the next read."""
    m = vitkit.create_model("vit_cifar_patch4_32", **tiny_kwargs(num_classes=3))
    opt = build_optimizer(m, 1e-3, 0.05)
    sched = WarmupCosine(1e-3, 10)
    good = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    bad = (torch.full((4, 3, 32, 32), float("nan")), good[1])
    state = StepState()
    cpu = torch.device("cpu")
    train_one_epoch(m, [good], opt, sched, state, device=cpu, clip_grad=1.0, defer_checks=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[next(m.parameters())].items()}
    with pytest.warns(UserWarning, match="non-finite loss or gradient in 1 of the last steps"):
        train_one_epoch(m, [bad], opt, sched, state, device=cpu, clip_grad=1.0, defer_checks=True, max_bad_steps=3)
    assert state.step == 2 and state.bad_streak == 1
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the bad step changed nothing
    assert all(torch.equal(v, opt.state[next(m.parameters())][k]) for k, v in moments.items())
    stats = train_one_epoch(m, [good], opt, sched, state, device=cpu, clip_grad=1.0, defer_checks=True)
    assert state.step == 3 and state.bad_streak == 0 and math.isfinite(stats["loss"])
    assert not all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.warns(UserWarning), pytest.raises(TrainingDiverged, match="NaN/Inf for 4 steps"):
        train_one_epoch(m, [bad] * 4 + [good] * 2, opt, sched, state, device=cpu, defer_checks=True, max_bad_steps=3)


def test_device_guard_streak_spans_epochs_and_reaches_mid_epoch_checkpoints():
    """A run of bad steps continues across an epoch boundary (and a resume: the streak is in the checkpointed
    state), and a checkpoint written mid-epoch carries the streak as of its step, not as of the last log read."""
    m = vitkit.create_model("vit_cifar_patch4_32", **tiny_kwargs(num_classes=3))
    opt = build_optimizer(m, 1e-3, 0.05)
    sched = WarmupCosine(1e-3, 10)
    good = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    bad = (torch.full((4, 3, 32, 32), float("nan")), good[1])
    cpu = torch.device("cpu")
    state = StepState()
    saved = []
    hooks = EpochHooks(after_step=lambda step: saved.append((step, state.bad_streak)), saves_after=lambda s: s == 3)
    with pytest.warns(UserWarning, match="non-finite"):
        train_one_epoch(
            m, [good, bad, bad], opt, sched, state, device=cpu, defer_checks=True, max_bad_steps=3, log_every=10,
            hooks=hooks,
        )  # fmt: skip
    assert (3, 2) in saved  # the checkpoint at step 3 saw both bad steps
    assert state.bad_streak == 2
    resumed = StepState(step=state.step, bad_streak=state.bad_streak)  # what a checkpoint restores
    with pytest.warns(UserWarning), pytest.raises(TrainingDiverged, match="NaN/Inf for 3 steps"):
        train_one_epoch(m, [bad, good], opt, sched, resumed, device=cpu, defer_checks=True, max_bad_steps=3)


def test_device_guard_matches_the_synchronous_guard_on_good_steps():
    """With no bad step the deferred guard runs the same arithmetic: same weights, same mean loss."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])) for _ in range(5)]
    results = []
    for defer in (False, True):
        torch.manual_seed(1)
        m = vitkit.create_model("vit_cifar_patch4_32", **tiny_kwargs(num_classes=3))
        opt = build_optimizer(m, 1e-3, 0.05)
        ema = ModelEma(m, 0.9)
        stats = train_one_epoch(
            m, batches, opt, WarmupCosine(1e-3, 10), StepState(), device=torch.device("cpu"), clip_grad=1.0,
            ema=ema, log_every=2, defer_checks=defer,
        )  # fmt: skip
        results.append((stats["loss"], m.state_dict(), ema.state_dict()))
    (loss_a, w_a, e_a), (loss_b, w_b, e_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a) and all(torch.equal(e_a[k], e_b[k]) for k in e_a)


def test_recipe_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# header\nlr: 0.004\nbatch_size: 64\nminutes: 3\naugment:\n  cutmix_alpha: 1.0\n"
        "  label_smoothing: 0.1\nmodel_kwargs:\n  stem: conv\n"
    )
    cfg = build_config(recipe, lr=0.01, epochs=2, augment={"label_smoothing": 0.2, "mixup_alpha": None})
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.minutes) == (0.01, 64, 2, None)  # flag beats recipe
    assert cfg.augment.cutmix_alpha == 1.0 and cfg.augment.label_smoothing == 0.2
    assert cfg.model_kwargs == {"stem": "conv"}
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1})
    shipped = load_recipe("cifar10_budget")  # the shipped recipe parses and names only known options
    assert shipped["minutes"] == 10
