"""The CPU kernels (vitkit/model/cpu_kernels.py, csrc/cpu_kernels.cpp). Attention: its packings are oneDNN's, its
output is SDPA's within bf16 rounding for any token count (padded keys get no weight), the fast path really calls
it (every block with more than one query). LayerNorm: F.layer_norm's output within bf16 rounding, called twice per
block. Without the library everything falls back to SDPA and F.layer_norm.

Where the kernel cannot be built (no AVX-512 BF16, no compiler) the kernel tests skip with the reason, except under
CI=true on a machine that can build it: there they must run."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.fast import kernels as cpu_kernels
from vitkit.fast import packing as fast_inference

from .conftest import tiny_kwargs

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def ext():
    if not cpu_kernels._enabled:
        pytest.skip("VITKIT_CPU_KERNELS=0: the kernels are switched off")
    reason = cpu_kernels.why_not_buildable()
    if reason and not cpu_kernels.library_path().exists():
        pytest.skip(f"the CPU kernels cannot be built here: {reason}")
    cpu_kernels.build()  # a no-op once `make setup` / `vitkit kernels build` has built it
    mod = cpu_kernels.kernel()
    if mod is None and IN_CI and not cpu_kernels.unsupported_here():  # a damaged library, not this CPU
        pytest.fail(f"built but not loaded: {cpu_kernels.status()}")
    if mod is None:
        pytest.skip(cpu_kernels.status())
    return mod


def _sdpa(qkv, heads, queries):
    """The reference: PyTorch's attention on the same (B, N, 3C) layout -> (B, Q, C)."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q[:, :, :queries], k, v).transpose(1, 2).reshape(B, queries, C3 // 3)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("keys", [1, 5, 16, 65, 197])
def test_packings_are_onednns(ext, head_dim, keys):
    torch.manual_seed(keys)
    k = torch.randn(keys, head_dim).bfloat16()
    padded = -(-keys // 16) * 16
    kt = torch.zeros(head_dim, padded, dtype=torch.bfloat16)  # kᵀ, zero columns past `keys`
    kt[:, :keys] = k.T
    ours = ext.packed_keys(k, padded)
    for n0 in range(0, padded, 64):  # packed in blocks of up to 64 key columns
        block = kt[:, n0 : n0 + 64].contiguous()
        assert torch.equal(ours[n0 * head_dim : n0 * head_dim + block.numel()], ext.onednn_pack(block).flatten())
    v = torch.zeros(padded, head_dim, dtype=torch.bfloat16)
    v[:keys] = k
    assert torch.equal(ext.packed_values(k, padded), ext.onednn_pack(v).flatten())


@pytest.mark.parametrize(
    "B,N,heads,head_dim,queries",
    [(2, 197, 6, 64, 197), (2, 197, 6, 64, 1), (1, 65, 3, 64, 65), (3, 50, 4, 32, 50), (2, 17, 2, 64, 5),
     (1, 1, 2, 32, 1), (5, 130, 1, 64, 130), (1, 300, 2, 64, 7)],
)  # fmt: skip
def test_matches_sdpa_within_bf16_rounding(ext, B, N, heads, head_dim, queries):
    torch.manual_seed(N)
    qkv = (torch.randn(B, N, 3 * heads * head_dim) * 2).bfloat16()
    exact = _sdpa(qkv.float(), heads, queries)
    ours = cpu_kernels.attention(qkv, heads, queries, head_dim**-0.5)
    theirs = _sdpa(qkv, heads, queries)
    assert ours.shape == (B, queries, heads * head_dim) and ours.dtype == torch.bfloat16
    err, sdpa_err = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
    assert err <= 1.5 * sdpa_err + 1e-3, (err, sdpa_err)
    # the padded keys take no weight: a value planted in them would show up otherwise
    assert (ours.float() - theirs.float()).abs().max() <= 0.05


def test_scale_is_honoured(ext):
    qkv = torch.randn(1, 33, 3 * 64).bfloat16()
    a = cpu_kernels.attention(qkv, 1, 33, 0.125)
    b = cpu_kernels.attention(qkv, 1, 33, 1.0)
    q, k, v = qkv.float().view(1, 33, 3, 1, 64).permute(2, 0, 3, 1, 4).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(1, 33, 64)
    assert (b.float() - ref).abs().max() <= 0.05
    assert (a.float() - b.float()).abs().max() > 0.05


@pytest.mark.parametrize(
    "qkv,heads,queries,match",
    [(torch.randn(1, 4, 3 * 64), 1, 4, "bf16"), (torch.randn(1, 4, 3 * 96).bfloat16(), 2, 4, "head_dim"),
     (torch.randn(1, 4, 3 * 64).bfloat16(), 1, 5, "queries"), (torch.randn(4, 3 * 64).bfloat16(), 1, 4, "bf16")],
)  # fmt: skip
def test_bad_input_is_refused_with_a_reason(ext, qkv, heads, queries, match):
    with pytest.raises(RuntimeError, match=match):
        cpu_kernels.attention(qkv, heads, queries, 0.125)


def _model(**kw):
    kw = tiny_kwargs(**{"embed_dim": 128, "num_heads": 2, "depth": 3, "patch_size": 4, **kw})
    return vitkit.create_model("vit_tiny_patch16_224", **kw).eval()


@pytest.fixture
def calls(monkeypatch):
    """The query counts `cpu_kernels.attention` was called with."""
    log = []
    orig = cpu_kernels.attention

    def spy(qkv, heads, queries, scale):
        log.append(queries)
        return orig(qkv, heads, queries, scale)

    monkeypatch.setattr(cpu_kernels, "attention", spy)
    return log


def _bf16(model, x):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x).float()


@pytest.mark.parametrize("extras", [{}, dict(reg_tokens=2, init_values=0.1), dict(global_pool="avg")])
def test_fast_path_calls_the_kernel_and_matches_sdpa(ext, calls, extras):
    model = _model(**extras)
    x = torch.randn(3, 3, 32, 32)
    fast = _bf16(model, x)
    with torch.inference_mode():
        ref = model(x)
    # every block but a class-token-only last one (one query: SDPA, see cpu_kernels.usable)
    assert calls == ([65 + extras.get("reg_tokens", 0)] * 2 if not extras.get("global_pool") else [65] * 3)
    calls.clear()
    with cpu_kernels.disabled():
        sdpa = _bf16(model, x)
    assert calls == []
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= 0.03 * scale
    assert (fast - sdpa).abs().max() <= 0.03 * scale


def test_shapes_it_does_not_take_keep_sdpa(ext, calls):
    assert cpu_kernels.usable(197, 64, 4) and cpu_kernels.usable(320, 32, 320)
    assert not cpu_kernels.usable(197, 64, 1)  # one query: SDPA skips the packing
    assert not cpu_kernels.usable(321, 64, 321) and not cpu_kernels.usable(197, 48, 197)
    model = _model(embed_dim=96, num_heads=2)  # head_dim 48
    qk = _model(qk_norm=True)
    long = _model(img_size=80)  # 401 tokens: past MAX_TOKENS, where SDPA is faster
    x = torch.randn(2, 3, 32, 32)
    _bf16(model, x), _bf16(qk, x), _bf16(long, torch.randn(1, 3, 80, 80))
    assert calls == []
    with torch.inference_mode():  # fp32 and training never reach the fast path at all
        _model()(x)
    assert calls == []


def test_without_the_library_the_fast_path_uses_sdpa(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_probed", True)
    monkeypatch.setattr(cpu_kernels, "_module", None)
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    out = _bf16(model, x)
    assert fast_inference.packed_layers(model), "the fast path did not engage"
    with torch.inference_mode():
        ref = model(x)
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
    assert not cpu_kernels.status().startswith("in use")


def test_a_damaged_library_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_probed", False)
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "cpu_supported", lambda: True)
    monkeypatch.setattr(cpu_kernels, "_enabled", True)  # whatever VITKIT_CPU_KERNELS says
    cpu_kernels.library_path().parent.mkdir(parents=True)
    cpu_kernels.library_path().write_bytes(b"not a shared library")
    with pytest.warns(UserWarning, match="vitkit kernels build"):
        assert cpu_kernels.kernel() is None
    assert not cpu_kernels.usable(197, 64, 197)


def test_build_key_follows_the_source_and_torch(monkeypatch):
    key = cpu_kernels.build_key()
    monkeypatch.setattr(cpu_kernels, "CFLAGS", cpu_kernels.CFLAGS + ["-DX"])
    assert cpu_kernels.build_key() != key
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cpu_kernels.build_key() != key


def test_cli_status_and_build_if_supported():
    run = lambda *a: subprocess.run([sys.executable, "-m", "vitkit", "kernels", *a], capture_output=True, text=True)
    status = run("status")
    assert status.returncode == 0 and status.stdout.startswith("cpu kernels: ")
    built = run("build", "--if-supported")
    assert built.returncode == 0 and "cpu kernels:" in built.stdout, built.stderr


def test_a_failed_build_does_not_fail_setup(monkeypatch, tmp_path, capsys):
    """`make setup` runs `vitkit kernels build --if-supported`: a compiler error there leaves SDPA, not a broken setup;
    without the flag the error is reported in one line (exit 1)."""
    from vitkit import cli

    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setattr(cpu_kernels, "why_not_buildable", lambda: None)

    def broken(verbose=False):
        raise RuntimeError("Error building extension 'vitkit_cpu_kernels'\nerror: 'brgemm' is not a member")

    monkeypatch.setattr(cpu_kernels, "build", broken)
    assert cli.main(["kernels", "build", "--if-supported"]) == 0
    assert "the build failed: error: 'brgemm' is not a member" in capsys.readouterr().out
    assert cli.main(["kernels", "build"]) == 1
    assert "building the CPU kernels failed" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(1, 197, 384), (3, 65, 192), (2, 5, 768), (7, 16)])
def test_layer_norm_matches_pytorchs_within_bf16_rounding(ext, shape):
    torch.manual_seed(shape[-1])
    x = (torch.randn(shape) * 3 + 1).bfloat16()
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    exact = F.layer_norm(x.float(), shape[-1:], w, b, 1e-6)
    ours = cpu_kernels.layer_norm(x, shape[-1:], w, b, 1e-6)
    theirs = F.layer_norm(x, shape[-1:], w, b, 1e-6)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert (ours.float() - exact).abs().max() <= 1.5 * (theirs.float() - exact).abs().max() + 1e-3
    # eps is honoured: a constant row normalises to the bias alone, whatever eps
    flat = torch.full(shape, 2.0).bfloat16()
    torch.testing.assert_close(
        cpu_kernels.layer_norm(flat, shape[-1:], w, b, 1e-6).float(), b.expand(shape), atol=0.02, rtol=0.01
    )


def test_layer_norm_falls_back_where_the_kernel_does_not_take_it(ext):
    x = torch.randn(2, 9, 64).bfloat16()
    w, b = torch.randn(64), torch.randn(64)
    for args in [(w.bfloat16(), b.bfloat16()), (w, None), (None, None)]:  # bf16 weights, no bias, no affine
        assert torch.equal(cpu_kernels.layer_norm(x, (64,), *args, 1e-5), F.layer_norm(x, (64,), *args, 1e-5))
    odd = torch.randn(2, 9, 20).bfloat16()
    assert torch.equal(
        cpu_kernels.layer_norm(odd, (20,), w[:20], b[:20], 1e-5), F.layer_norm(odd, (20,), w[:20], b[:20], 1e-5)
    )
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.layer_norm(odd, w[:20], b[:20], 1e-5)


def test_fast_path_runs_both_layernorms_of_every_block_in_the_kernel(ext, monkeypatch):
    seen = []
    orig = cpu_kernels.layer_norm
    monkeypatch.setattr(cpu_kernels, "layer_norm", lambda x, *a: seen.append(x.shape) or orig(x, *a))
    model = _model()
    _bf16(model, torch.randn(2, 3, 32, 32))
    assert len(seen) == 2 * 3  # norm1 and norm2 of the 3 blocks (the last block's norm2 on its one row)
    assert seen[-1] == (2, 1, 128)


# ------------------------------------------------------------------ training: attention with its own backward
def _attention_fp32(qkv, heads):
    """Reference softmax(q kᵀ / √d) v in fp32 from a (B, N, 3C) qkv, differentiable -> (B, N, C)."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)


@pytest.mark.parametrize(
    "B,N,heads,head_dim",
    [(2, 197, 6, 64), (2, 65, 3, 64), (3, 17, 2, 32), (1, 1, 2, 64), (2, 64, 2, 64), (1, 300, 2, 32), (4, 5, 1, 32)],
)  # fmt: skip
def test_training_attention_and_its_gradient_match_fp32(ext, B, N, heads, head_dim):
    """Output and d(qkv) within the error of bf16 explicit attention (what training ran before) of the fp32 values."""
    torch.manual_seed(N)
    qkv = (torch.randn(B, N, 3 * heads * head_dim) * 1.5).bfloat16()
    grad = torch.randn(B, N, heads * head_dim).bfloat16()
    exact_in = qkv.float().requires_grad_()
    exact = _attention_fp32(exact_in, heads)
    exact.backward(grad.float())
    bf16_in = qkv.clone().requires_grad_()  # the same product in bf16, the yardstick for rounding
    _attention_fp32(bf16_in, heads).backward(grad)
    ours_in = qkv.clone().requires_grad_()
    ours = cpu_kernels.attention_with_grad(ours_in, heads, head_dim**-0.5)
    ours.backward(grad)
    assert ours.shape == exact.shape and ours.dtype == ours_in.grad.dtype == torch.bfloat16
    out_err, grad_err = (ours.float() - exact).abs().max(), (ours_in.grad.float() - exact_in.grad).abs().max()
    ref_grad_err = (bf16_in.grad.float() - exact_in.grad).abs().max()
    assert out_err <= 0.01 * exact.abs().max() + 1e-3, out_err
    assert grad_err <= 2 * ref_grad_err + 1e-3, (grad_err, ref_grad_err)
    # every third of d(qkv) is written: q, k and v all get their gradient (a pass left out would leave garbage)
    C = heads * head_dim
    for part in range(3):
        sl = slice(part * C, (part + 1) * C)
        assert (ours_in.grad[..., sl].float() - exact_in.grad[..., sl]).abs().max() <= 2 * ref_grad_err + 1e-3


def test_training_attention_backward_refuses_bad_input(ext):
    qkv = torch.randn(1, 8, 3 * 64).bfloat16()
    out, lse = ext.attention_forward(qkv, 1, 0.125)
    with pytest.raises(RuntimeError, match="lse"):
        ext.attention_backward(out, qkv, out, lse[..., :4].contiguous(), 1, 0.125)
    with pytest.raises(RuntimeError, match="dout and out"):
        ext.attention_backward(out.float(), qkv, out, lse, 1, 0.125)


def _train_step_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.fixture
def train_calls(monkeypatch):
    """The token counts `cpu_kernels.attention_with_grad` was called with."""
    log = []
    orig = cpu_kernels.attention_with_grad

    def spy(qkv, heads, scale):
        log.append(qkv.shape[1])
        return orig(qkv, heads, scale)

    monkeypatch.setattr(cpu_kernels, "attention_with_grad", spy)
    return log


def test_bf16_training_runs_attention_on_the_kernel_with_the_same_gradients(ext, train_calls):
    torch.manual_seed(0)
    model = _model().train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    ours = _train_step_grads(model, x, y)
    assert train_calls == [65, 65]  # blocks 0 and 1; the class-token-only last block keeps explicit attention
    with cpu_kernels.disabled():
        ref = _train_step_grads(model, x, y)
    assert train_calls == [65, 65]
    for name, g in ref.items():
        assert (ours[name] - g).abs().max() <= 0.05 * g.abs().max() + 1e-4, name


def test_training_cases_the_kernel_does_not_take(ext, train_calls):
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    _train_step_grads(_model(qk_norm=True).train(), x, y)
    _train_step_grads(_model(attn_drop_rate=0.1).train(), x, y)
    _train_step_grads(_model(attn_backend="math").train(), x, y)
    _train_step_grads(_model(embed_dim=96, num_heads=2).train(), x, y)  # head_dim 48
    model = _model().train()
    F.cross_entropy(model(x), y).backward()  # fp32 training: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, return_attention=[0])  # a returned map needs explicit attention
    assert train_calls == [65]  # only the map request's other block (1; block 2 is class-token-only)


@pytest.mark.parametrize("shape", [(2, 197, 384), (3, 7), (17,)])  # numel not a multiple of 16: the masked tail
def test_residual_add_is_the_exact_sum_and_passes_gradients_on(ext, shape):
    torch.manual_seed(0)
    x = torch.randn(shape).requires_grad_()
    y = torch.randn(shape).bfloat16().requires_grad_()
    out = cpu_kernels.residual_add(x, y)
    assert out.dtype == torch.float32 and torch.equal(out, x.detach() + y.detach().float())
    g = torch.randn(shape)
    out.backward(g)
    assert torch.equal(x.grad, g) and y.grad.dtype == torch.bfloat16 and torch.equal(y.grad, g.bfloat16())


def test_residual_add_falls_back_where_the_kernel_does_not_take_it(ext, monkeypatch):
    def boom(*a):
        raise AssertionError("the kernel was called")

    monkeypatch.setattr(cpu_kernels._ResidualAdd, "apply", boom)
    x, yb = torch.randn(4, 16), torch.randn(4, 16).bfloat16()
    for a, b in ((x, x), (yb, yb), (x, torch.randn(1, 16).bfloat16()), (x.t(), yb.t())):  # dtypes, broadcast, strides
        assert torch.equal(cpu_kernels.residual_add(a, b), a + b)


def test_layer_norm_to_bf16_matches_fp32_layer_norm_and_its_gradients(ext):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(384, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    x = (torch.randn(4, 50, 384) * 3 + 1).requires_grad_()
    g = torch.randn(4, 50, 384).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu_kernels.layer_norm_to_bf16(x, norm)
    assert y is not None and y.dtype == torch.bfloat16
    y.backward(g)
    ours = x.grad, norm.weight.grad, norm.bias.grad
    x.grad = norm.weight.grad = norm.bias.grad = None
    ref = F.layer_norm(x, (384,), norm.weight, norm.bias, 1e-6)
    ref.backward(g.float())
    assert (y.float() - ref).abs().max() <= 2**-8 * ref.abs().max()  # bf16 rounding of the fp32 result
    for got, want in zip(ours, (x.grad, norm.weight.grad, norm.bias.grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_layer_norm_to_bf16_only_under_bf16_autocast_with_grad(ext):
    norm, x = torch.nn.LayerNorm(32), torch.randn(2, 32)
    assert cpu_kernels.layer_norm_to_bf16(x, norm) is None  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.layer_norm_to_bf16(x, norm) is not None
        with torch.no_grad():
            assert cpu_kernels.layer_norm_to_bf16(x, norm) is None  # not training
        assert cpu_kernels.layer_norm_to_bf16(x.bfloat16(), norm) is None
        assert cpu_kernels.layer_norm_to_bf16(torch.randn(2, 24), torch.nn.LayerNorm(24)) is None  # width % 16
        assert cpu_kernels.layer_norm_to_bf16(x, torch.nn.LayerNorm(32, elementwise_affine=False)) is None
        assert cpu_kernels.layer_norm_to_bf16(torch.randn(32, 2).t(), norm) is None  # not contiguous
    with torch.autocast("cpu", dtype=torch.float16):
        assert cpu_kernels.layer_norm_to_bf16(x, norm) is None


def test_bf16_training_step_uses_the_norm_and_add_kernels_with_the_same_gradients(ext, monkeypatch):
    seen = {"norm": 0, "add": 0}
    norm, add = cpu_kernels._LayerNormToBF16.apply, cpu_kernels._ResidualAdd.apply

    def count(key, fn):
        def wrapped(*a):
            seen[key] += 1
            return fn(*a)

        return wrapped

    monkeypatch.setattr(cpu_kernels._LayerNormToBF16, "apply", count("norm", norm))
    monkeypatch.setattr(cpu_kernels._ResidualAdd, "apply", count("add", add))
    torch.manual_seed(0)
    model = _model(drop_path_rate=0.1).train()  # drop-path keeps a bf16 branch: still the kernel's add
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    torch.manual_seed(1)
    ours = _train_step_grads(model, x, y)
    # 3 blocks x (norm1, norm2) and two residual adds, but the first add of the class-token-only last block, whose
    # stream is the (B, 1, D) slice of the class token (not contiguous): PyTorch's add there
    assert seen == {"norm": 6, "add": 5}
    torch.manual_seed(1)  # the same drop-path draws
    with cpu_kernels.disabled():
        ref = _train_step_grads(model, x, y)
    assert seen == {"norm": 6, "add": 5}
    for name, g in ref.items():
        assert (ours[name] - g).abs().max() <= 0.05 * g.abs().max() + 1e-4, name


def test_gradient_checkpointing_recomputes_the_training_kernels_exactly(ext, train_calls):
    torch.manual_seed(0)
    model = _model().train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    plain = _train_step_grads(model, x, y)
    model.set_grad_checkpointing(True)
    recomputed = _train_step_grads(model, x, y)
    assert train_calls == [65, 65] + [65, 65] * 2  # forward once; with checkpointing forward + recompute
    for name, g in plain.items():
        assert torch.equal(recomputed[name], g), name
