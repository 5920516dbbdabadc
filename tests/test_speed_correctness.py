"""The fast paths give the same answers: backends agree in fp32, bf16 stays within bf16 tolerance of fp32, timm
checkpoints give timm's logits, and a short training run follows the reference loss curve."""

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.model.attention_backend import MATH_MAX_TOKENS, pick_backend

from .conftest import tiny_kwargs


def _pair(**kw):
    """The same weights under two backends."""
    a = vitkit.create_model("vit_tiny_patch16_224", attn_backend="sdpa", **tiny_kwargs(**kw))
    b = vitkit.create_model("vit_tiny_patch16_224", attn_backend="math", **tiny_kwargs(**kw))
    b.load_state_dict(a.state_dict())
    return a, b


def test_auto_rule_reads_the_measured_table():
    limit = MATH_MAX_TOKENS[("cpu", True)]
    assert pick_backend("cpu", limit, training=True) == "math"
    assert pick_backend("cpu", limit + 1, training=True) == "sdpa"
    assert pick_backend("cuda", 65, training=True) == "sdpa"
    assert pick_backend("cpu", 65, training=True, low_precision=False) == "sdpa"  # fp32: SDPA wins or ties


def test_auto_uses_explicit_attention_only_for_bf16_training(monkeypatch):
    import vitkit.model.layers as layers

    seen = []
    real = layers.pick_backend
    monkeypatch.setattr(layers, "pick_backend", lambda *a: seen.append(real(*a)) or seen[-1])
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=1))
    x = torch.randn(2, 3, 32, 32)
    model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        with torch.no_grad():
            model(x)
    assert seen == ["sdpa", "math", "sdpa"]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_backends_agree_in_training_forward_and_gradients_fp32(qk_norm):
    sdpa, math = _pair(qk_norm=qk_norm, depth=3, drop_path_rate=0.0)
    auto = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(qk_norm=qk_norm, depth=3))
    auto.load_state_dict(sdpa.state_dict())
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    grads = []
    for m in (sdpa, math, auto):
        m.train()
        F.cross_entropy(m(x), y).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert (g - other[name]).abs().max() <= 1e-5, name


def test_bf16_autocast_logits_within_bf16_tolerance_of_fp32():
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=4, embed_dim=64)).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x).float()
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the training (math) path too
            fast_train = model(x.requires_grad_()).float().detach()
    scale = ref.abs().max()
    for out in (fast, fast_train):
        assert (out - ref).abs().max() <= 0.03 * scale  # bf16 keeps 8 bits: ~0.4 % per op, a few ops deep
        assert not torch.allclose(out, ref, atol=0, rtol=0)  # it really ran in bf16


def test_timm_checkpoint_gives_timm_logits_in_fp32_on_both_paths():
    timm = pytest.importorskip("timm")
    kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=7)
    ref = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    ours = vitkit.create_model("vit_tiny_patch16_224", **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same keys, 1:1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        assert (ours(x) - expected).abs().max() <= 1e-5  # inference: sdpa
    x.requires_grad_()
    assert (ours(x) - ref(x)).abs().max() <= 1e-5  # with grad: auto picks the explicit path at 65 tokens


def _loss_curve(model, steps, autocast, seed=0):
    """Train on a fixed toy task (class = which colour channel is shifted, and which way) and return the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 3, 16, 16, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        for i, c in enumerate(y.tolist()):
            x[i, c % 3] += 0.3 if c < 3 else -0.3
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize(
    "width", [{}, dict(embed_dim=64, num_heads=2)], ids=["head_dim8", "head_dim32"]
)  # head_dim 32: the training attention runs on vitkit's CPU kernels where they are built (cpu_kernels.py)
def test_200_step_loss_curve_of_fast_path_matches_fp32_reference(width):
    kw = tiny_kwargs(img_size=16, patch_size=4, num_classes=4, **width)
    ref_model = vitkit.create_model("vit_tiny_patch16_224", attn_backend="sdpa", **kw)
    fast_model = vitkit.create_model("vit_tiny_patch16_224", **kw)  # auto backend, bf16 autocast: the default path
    fast_model.load_state_dict(ref_model.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is ~10x faster than two fighting other jobs for the cores
    try:
        ref = _loss_curve(ref_model, 200, autocast=False)
        fast = _loss_curve(fast_model, 200, autocast=True)
    finally:
        torch.set_num_threads(threads)
    ref_w, fast_w = ref.view(10, 20).mean(1), fast.view(10, 20).mean(1)  # 20-step windows
    assert ref_w[-1] < 0.2 * ref_w[0], "the reference did not learn the toy task; the test would prove nothing"
    # seed-to-seed noise of this curve is ~0.07 early and ~0.01 late; bf16 must stay inside that
    assert ((ref_w - fast_w).abs() <= 0.03 + 0.1 * ref_w).all(), (ref_w, fast_w)


def test_low_precision_inference_copy_matches_fp32_and_leaves_the_model_alone():
    from vitkit.model.precision import low_precision_inference

    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=4, embed_dim=64)).eval()
    fast = low_precision_inference(model)
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        ref, out = model(x), fast(x)
        logits, maps = fast(x, return_attention=[0])
    assert next(model.parameters()).dtype == torch.float32
    assert next(fast.parameters()).dtype == torch.bfloat16
    assert out.dtype == torch.float32 and (out - ref).abs().max() <= 0.03 * ref.abs().max()
    assert (logits - out).abs().max() <= 0.03 * ref.abs().max() and maps[0].shape == (8, 4, 17, 17)
