"""What a training step must do, checked on a tiny ViT: gradient clipping bounds the norm the optimizer sees,
k accumulated micro-batches equal one k-times batch, and drop path is active in training and the identity in eval."""

import pytest
import torch

from vitkit.model.layers import DropPath
from vitkit.train.loop import StepState, train_one_epoch
from vitkit.train.schedule import WarmupCosine

from .conftest import tiny_model

CPU = torch.device("cpu")


class RecordingSGD(torch.optim.SGD):
    """SGD that records, at each step, the global norm of the gradients it is about to apply, and the gradients."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, lr=lr)
        self.norms: list[float] = []
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        self.grads.append(grads)
        return super().step(closure)


def _batches(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def _run(model, batches, grad_accum: int = 1, clip_grad: float | None = None, lr: float = 0.1):
    """fp32 steps of train_one_epoch with RecordingSGD; returns (stats, optimizer)."""
    opt = RecordingSGD(model.parameters(), lr)
    stats = train_one_epoch(
        model, batches, opt, WarmupCosine(lr, 100), StepState(), device=CPU, precision="fp32",
        grad_accum=grad_accum, clip_grad=clip_grad, defer_checks=False,
    )  # fmt: skip
    return stats, opt


def test_clipping_bounds_the_gradient_norm_the_optimizer_applies():
    batches = _batches(4, 8)
    _, free = _run(tiny_model(), batches)
    clip = 0.5 * min(free.norms)  # well under every raw norm, so each step must be clipped
    _, clipped = _run(tiny_model(), batches, clip_grad=clip)
    assert max(clipped.norms) <= clip * (1 + 1e-5)
    assert min(clipped.norms) >= clip * (1 - 1e-3)  # scaled down to the bound, not zeroed
    # clipping rescales: the first step's gradients (same weights in both runs) point the same way
    for a, b in zip(free.grads[0], clipped.grads[0]):
        torch.testing.assert_close(b, a * (clip / free.norms[0]), rtol=1e-4, atol=1e-7)


def test_accumulated_micro_batches_equal_one_large_batch():
    """grad_accum=4 over batches of 4 must take the steps one batch of 16 takes: same gradients, same weights."""
    big = _batches(3, 16)
    micro = [(x[i : i + 4], y[i : i + 4]) for x, y in big for i in range(0, 16, 4)]
    model_one, model_acc = tiny_model(), tiny_model()
    one, one_opt = _run(model_one, big)
    acc, acc_opt = _run(model_acc, micro, grad_accum=4)
    assert len(acc_opt.grads) == len(one_opt.grads) == 3  # one optimizer step per 4 micro-batches
    for step_one, step_acc in zip(one_opt.grads, acc_opt.grads):
        for a, b in zip(step_one, step_acc):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)  # summation order: float32 round-off only
    for (name, a), b in zip(model_one.state_dict().items(), model_acc.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    assert acc["loss"] == pytest.approx(one["loss"], rel=1e-5)  # the reported loss is the big batch's mean too


def test_drop_path_drops_whole_samples_in_training_and_nothing_in_eval():
    drop = DropPath(0.5).train()
    x = torch.ones(4000, 3, 2)
    out = drop(x)
    kept = out.flatten(1).amax(1) > 0
    assert set(out.unique().tolist()) == {0.0, 2.0}  # a sample is dropped whole or kept, rescaled by 1 / (1 - p)
    assert all(torch.equal(row, torch.full_like(row, row[0, 0])) for row in out[:50])
    assert 0.45 < kept.float().mean() < 0.55 and out.mean() == pytest.approx(1.0, abs=0.05)  # unbiased on average
    assert torch.equal(drop.eval()(x), x)


def test_drop_path_in_a_model_is_random_in_training_and_off_in_eval():
    """drop_path_rate reaches the blocks: training forwards differ from call to call and from a model without it;
    in eval the model computes exactly what the same weights without drop path compute."""
    x = torch.randn(8, 3, 32, 32)
    model = tiny_model(drop_path_rate=0.5, depth=4)
    plain = tiny_model(depth=4)
    plain.load_state_dict(model.state_dict())
    assert any(isinstance(m, DropPath) and m.p > 0 for m in model.modules())
    model.train(), plain.train()
    with torch.no_grad():
        a, b, reference = model(x), model(x), plain(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, reference)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
