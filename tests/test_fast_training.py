"""The wiring of bf16 training onto vitkit's CPU kernels (vitkit/fast/training.py), on any machine.

The kernels themselves need AVX-512 BF16 and oneDNN's brgemm (tests/test_cpu_kernels.py checks their numbers where
they run). Here each kernel is replaced by PyTorch ops with the same contract, so what is checked is the runner:
which calls go to the kernels, that the gradients are those of the plain modules, and where it steps aside.
"""

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import fast
from vitkit.fast import kernels

from .conftest import tiny_kwargs


def _model(**kw):
    kw = tiny_kwargs(**{"embed_dim": 128, "num_heads": 2, "depth": 3, "patch_size": 4, **kw})
    return vitkit.create_model("vit_tiny_patch16_224", **kw).train()


def _attention(qkv, heads, scale):
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, N, C3 // 3)


@pytest.fixture
def stand_ins(monkeypatch):
    """Kernels 'loaded', each op replaced by PyTorch's; returns the call log {op: [shape, ...]}."""
    log = {"attention": [], "norm": [], "add": []}

    def logged(name, fn):
        return lambda *a: log[name].append(tuple(a[0].shape)) or fn(*a)

    monkeypatch.setattr(kernels, "kernel", lambda: object())
    monkeypatch.setattr(kernels._Attention, "apply", logged("attention", _attention))
    norm = lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps).bfloat16()  # noqa: E731
    monkeypatch.setattr(kernels._LayerNormToBF16, "apply", logged("norm", norm))
    monkeypatch.setattr(kernels._ResidualAdd, "apply", logged("add", lambda x, y: x + y))
    return log


def _grads(model, x, y, autocast=True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_bf16_training_runs_on_the_kernels_with_the_plain_modules_gradients(stand_ins):
    torch.manual_seed(0)
    model = _model(drop_path_rate=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    torch.manual_seed(1)
    ours = _grads(model, x, y)
    # blocks 0 and 1 on the attention kernel; the last block computes the class row only (explicit attention)
    assert stand_ins["attention"] == [(4, 65, 384)] * 2
    # 3 blocks x (norm1, norm2); every residual add but the last block's first (its class-row slice is not
    # contiguous, so PyTorch's add)
    assert len(stand_ins["norm"]) == 6 and len(stand_ins["add"]) == 5
    torch.manual_seed(1)  # the same drop-path draws
    with kernels.disabled():
        ref = _grads(model, x, y)
    for name, g in ref.items():
        assert (ours[name] - g).abs().max() <= 0.05 * g.abs().max() + 1e-4, name


def test_the_runner_steps_aside_where_the_kernels_do_not_apply(stand_ins):
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    _grads(_model(qk_norm=True), x, y)
    _grads(_model(attn_drop_rate=0.1), x, y)
    _grads(_model(attn_backend="math"), x, y)
    _grads(_model(embed_dim=96, num_heads=2), x, y)  # head_dim 48: not a kernel width
    assert stand_ins["attention"] == []
    model = _model()
    _grads(model, x, y, autocast=False)  # fp32 training: no runner at all
    assert fast.select(model, x, set(), pooled_only=False) is None
    calls_before = len(stand_ins["attention"])
    handle = model.blocks[0].register_forward_hook(lambda *a: None)  # a hooked block keeps its own forward
    _grads(model, x, y)
    handle.remove()
    assert len(stand_ins["attention"]) == calls_before + 1  # block 1 only


def test_gradient_checkpointing_recomputes_through_the_runner(stand_ins):
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    plain = _grads(model, x, y)
    model.set_grad_checkpointing(True)
    recomputed = _grads(model, x, y)
    assert len(stand_ins["attention"]) == 2 + 2 * 2  # forward once; with checkpointing forward + recompute
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, msg=name)


def test_inference_and_training_pick_their_runners():
    model = _model().eval()
    x = torch.randn(1, 3, 32, 32)
    assert type(fast.select(model, x, set(), pooled_only=True)) is fast.Runner  # fp32: only the shortened block
    assert fast.select(model, x, set(), pooled_only=False) is None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        runner = fast.select(model, x, set(), pooled_only=True)
    assert isinstance(runner, fast.InferenceRunner) == fast.packing.available()
