"""Lookahead (`lookahead_every`, `lookahead_decay`): every k steps a slow copy s <- lerp(s, w, 1 - d_t) and w <- s,
d_t = decay x progress^3, a last w <- s when training ends; it travels in last.ckpt, so a resumed run with it on
(and the EMA beside it) stays bit-identical."""

import argparse

import pytest
import torch
from torch import nn

from vitkit.train import TrainConfig, fit
from vitkit.train.checkpoint import load_checkpoint
from vitkit.train.ema import Lookahead
from vitkit.train.options import add_training_arguments, overrides_from_args

from .conftest import tiny_digits_config


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_every_kth_step_moves_the_slow_copy_toward_the_weights_and_the_weights_onto_it():
    net = small_net()
    look = Lookahead(net, every=5, decay=0.8)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # the optimizer's steps since the last copy
    net.state_dict()["1.num_batches_tracked"].fill_(7)
    moved = {k: v.clone() for k, v in net.state_dict().items()}

    look.after_step(net, 4, total_steps=10)  # not a 5th step: nothing happens
    assert all(torch.equal(net.state_dict()[k], moved[k]) for k in moved)

    look.after_step(net, 5, total_steps=10)  # progress 0.5: d = 0.8 * 0.125 = 0.1
    d = 0.8 * 0.5**3
    assert look.decay_at(5, 10) == pytest.approx(d)
    for name, w in net.state_dict().items():
        if w.dtype.is_floating_point:
            want = start[name] + (1 - d) * (moved[name] - start[name])
            torch.testing.assert_close(w, want)
            assert torch.equal(look.slow[name], w)  # the weights are the slow copy now
    assert look.slow["1.num_batches_tracked"].item() == 7  # the integer counter is copied, not averaged


def test_the_decay_ramps_from_nothing_to_the_full_decay_and_finish_lands_on_the_slow_copy():
    net = small_net()
    look = Lookahead(net, every=1, decay=0.5)
    assert look.decay_at(0, 100) == 0.0 and look.decay_at(100, 100) == 0.5 and look.decay_at(150, 100) == 0.5
    slow = {k: v.clone() for k, v in look.slow.items()}
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    look.finish(net)  # decay 1: the slow copy stays, the weights become it
    assert all(torch.equal(look.slow[k], slow[k]) for k in slow)
    assert torch.equal(net[0].weight, slow["0.weight"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="every >= 1"):
        Lookahead(small_net(), every=0, decay=0.5)
    with pytest.raises(ValueError, match="lookahead_decay"):
        TrainConfig(data="digits", lookahead_every=5, lookahead_decay=1.5)
    with pytest.raises(ValueError, match="lookahead_every"):
        TrainConfig(data="digits", lookahead_every=-1)
    with pytest.raises(ValueError, match="--fsdp"):
        TrainConfig(data="digits", lookahead_every=5, fsdp=True)
    with pytest.raises(ValueError, match="does not match"):
        Lookahead(small_net(), every=5, decay=0.5).load_state_dict({"0.weight": torch.zeros(4, 3)})


def test_the_flags_set_the_options():
    p = argparse.ArgumentParser()
    add_training_arguments(p)
    args = p.parse_args(["--lookahead-every", "5", "--lookahead-decay", "0.9"])
    got = overrides_from_args(args)
    assert got["lookahead_every"] == 5 and got["lookahead_decay"] == 0.9
    assert TrainConfig().lookahead_every == 0 and TrainConfig().lookahead_decay == pytest.approx(0.95**5)


def tiny_run(out, **kw):
    """The exact-resume test's run (tests/test_train_resume.py) with lookahead every 3 steps and the EMA on."""
    augment = dict(random_crop_pad=1, hflip=True, mixup_alpha=0.2, label_smoothing=0.1, random_erasing=0.25)
    base = dict(epochs=2, batch_size=64, warmup_epochs=0.5, ema_decay=0.9, grad_accum=2, augment=augment)
    return tiny_digits_config(out, lookahead_every=3, **{**base, **kw})


def test_resume_with_lookahead_is_bit_identical(tmp_path):
    straight = fit(tiny_run(tmp_path / "straight"))
    half = fit(tiny_run(tmp_path / "resumed", stop_after_steps=37))  # 37: one step past a copy-back
    assert not half.finished and half.steps == 37
    mid = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert mid["lookahead"] is not None and mid["lookahead"].keys() == mid["model"].keys()
    assert not torch.equal(mid["model"]["head.weight"], mid["lookahead"]["head.weight"])  # a pause keeps the fast w
    resumed = fit(tiny_run(tmp_path / "resumed"))
    assert resumed.finished and resumed.steps == straight.steps == 50

    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    for part in ("model", "ema", "lookahead"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for k in a["model"]:  # the run ended on the slow copy; the EMA averaged on its own
        assert torch.equal(a["model"][k], a["lookahead"][k]), k
    assert not torch.equal(a["ema"]["head.weight"], a["model"]["head.weight"])
    assert straight.val_top1 == resumed.val_top1
