"""Progressive resizing (TrainConfig.progressive_sizes): the size follows the step, the model sees the small batches
then the full ones, a resume across the switch is exact, and configs it cannot serve are refused."""

import argparse

import pytest
import torch

from vitkit.model.loading import load_model
from vitkit.model.vit import VisionTransformer
from vitkit.train import TrainConfig, fit
from vitkit.train.checkpoint import load_checkpoint
from vitkit.train.options import add_training_arguments, overrides_from_args
from vitkit.train.progressive import ProgressiveResize, size_at
from vitkit.train.recipe import build_config
from vitkit.train.schedule import WarmupCosine

from .conftest import tiny_digits_config

HALF_AND_HALF = [[0.0, 4], [0.5, 8]]  # digits are 8x8 with 2-px patches: a 2x2 grid, then the full 4x4


def test_size_switches_at_the_fraction_of_the_schedule_and_follows_a_relayout():
    steps = ((0.0, 24), (0.5, 32))
    assert [size_at(steps, s, 10) for s in range(10)] == [24] * 5 + [32] * 5
    schedule = WarmupCosine(1e-3, 10)
    resize = ProgressiveResize(steps, schedule)
    x = torch.rand(2, 3, 32, 32)
    assert resize(x, 4).shape == (2, 3, 24, 24)
    assert resize(x, 5) is x  # full size: the batch as the transform made it
    schedule.relayout(20)  # a --minutes budget found room for more steps: the switch moves with it
    assert resize(x, 5).shape == (2, 3, 24, 24) and resize(x, 10) is x


def test_model_sees_small_batches_then_full_ones_and_evaluates_at_full_size(tmp_path, monkeypatch):
    seen: list[tuple[bool, int]] = []
    forward = VisionTransformer.forward

    def spy(self, x, *args, **kwargs):
        seen.append((self.training, x.shape[-1]))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "forward", spy)
    result = fit(tiny_digits_config(tmp_path, epochs=1, batch_size=128, progressive_sizes=HALF_AND_HALF))
    train_sizes = [side for training, side in seen if training]
    assert result.steps == 12 and train_sizes == [4] * 6 + [8] * 6
    assert {side for training, side in seen if not training} == {8}
    assert load_model(result.model_path).cfg.dynamic_img_size  # the saved model takes either size


def _run(out, **kw):
    augment = dict(random_crop_pad=1, hflip=True, mixup_alpha=0.2, label_smoothing=0.1)
    base = dict(epochs=1, batch_size=64, warmup_epochs=0.2, ema_decay=0.9, augment=augment)
    return tiny_digits_config(out, progressive_sizes=HALF_AND_HALF, **{**base, **kw})


def test_resume_across_the_switch_is_bit_identical(tmp_path):
    straight = fit(_run(tmp_path / "straight"))  # 25 steps: 4 px until step 13, then 8 px
    half = fit(_run(tmp_path / "resumed", stop_after_steps=8))
    assert not half.finished and half.steps == 8
    resumed = fit(_run(tmp_path / "resumed"))
    assert resumed.finished and resumed.steps == straight.steps == 25
    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert straight.val_top1 == resumed.val_top1


def test_flag_and_recipe_spellings_agree():
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    args = parser.parse_args(["--data", "digits", "--progressive-sizes", "0:24", "0.5:32"])
    from_flag = build_config(**overrides_from_args(args))
    assert from_flag.progressive_sizes == ((0.0, 24), (0.5, 32))
    from_yaml = TrainConfig(data="digits", progressive_sizes=[[0, 24], [0.5, 32]])
    assert from_yaml.progressive_sizes == from_flag.progressive_sizes
    assert TrainConfig(data="digits", progressive_sizes=[]).progressive_sizes is None  # empty: off


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([[0.5, 24], [0.7, 32]], "start at 0"),
        ([[0.0, 32], [0.0, 24]], "rise"),
        ([[0.0, 24], [1.0, 32]], "rise within"),
        ([[0.0, 0]], "positive whole number"),
        ([[0.0, 24.5]], "positive whole number"),
        ([24, 32], "each entry"),
        (["0.5-32"], "FRAC:PX"),
    ],
)
def test_malformed_sizes_are_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="digits", progressive_sizes=sizes)


def test_other_tasks_are_refused():
    with pytest.raises(ValueError, match="classify task"):
        TrainConfig(data="digits", task="segment", progressive_sizes=[[0.0, 24], [0.5, 32]])


@pytest.mark.parametrize(
    ("sizes", "message"), [([[0.0, 5], [0.5, 8]], "multiples of the model's patch size"), ([[0.0, 4]], "end at")]
)
def test_sizes_the_model_cannot_take_are_refused(tmp_path, sizes, message):
    with pytest.raises(ValueError, match=message):
        fit(tiny_digits_config(tmp_path, epochs=1, progressive_sizes=sizes))
