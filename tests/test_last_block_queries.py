"""`VisionTransformer.forward` with "token" pooling runs the last block for the class token's row only
(`vitkit.fast.blocks.Runner`, `block_forward(rows=1)`):
the logits and the gradients stay those of the full model, and it steps aside where
someone could see the shorter tensors (hooks, the last layer's attention map) or where the pool reads every token."""

import pytest
import torch

import vitkit
from vitkit.fast import packing as fast_inference
from vitkit.fast.blocks import block_forward
from vitkit.fast.inference import block_plan, run_plan
from vitkit.model import layers as layers_mod

from .conftest import tiny_kwargs


def _model(**kw):
    return vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=3, embed_dim=64, **kw))


def _full(model, x):
    """The reference: every block on every token (forward_features never shortens the last block)."""
    return model.forward_head(model.forward_features(x))


@pytest.fixture
def query_log(monkeypatch):
    """The query rows of each attention call, None where it had one per token, in call order (patched on the class:
    an instance hook would make forward() keep the full last block)."""
    log = []
    orig = layers_mod.Attention.attend

    def spy(self, q, k, v, need_weights=False):
        log.append(None if q.shape[2] == k.shape[2] else q.shape[2])
        return orig(self, q, k, v, need_weights)

    monkeypatch.setattr(layers_mod.Attention, "attend", spy)
    return log


@pytest.mark.parametrize("extras", [{}, dict(reg_tokens=2, init_values=0.1), dict(qk_norm=True)])
def test_logits_match_the_full_model_and_only_the_last_block_is_shortened(extras, query_log):
    model = _model(**extras).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), fast_inference.disabled():  # the module path, fp32: only the row count differs
        ref = _full(model, x)
        query_log.clear()
        out = model(x)
    assert query_log == [None, None, 1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_training_gradients_match_the_full_model():
    torch.manual_seed(0)
    model = _model(reg_tokens=1, drop_path_rate=0.0).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for forward in (model, lambda t: _full(model, t)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_passes_the_queries_through(query_log):
    model = _model().train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()  # the recomputation in backward runs the same shortened block again
    assert query_log[:3] == [None, None, 1] and set(query_log[3:]) <= {None, 1}
    ref = _full(model, x)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_bf16_fast_path_logits_match_the_full_fast_path():
    model = _model(reg_tokens=1).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x), _full(model, x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("where", ["block", "submodule", "norm", "global"])
def test_a_hook_that_could_see_the_last_block_keeps_it_whole(where, query_log):
    model = _model().eval()
    shapes = []
    hook = lambda m, args, out: shapes.append(m)  # noqa: E731
    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
    else:
        target = {"block": model.blocks[-1], "submodule": model.blocks[-1].mlp.fc2, "norm": model.norm}[where]
        handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()
    assert shapes and query_log == [None, None, None]


def test_pools_that_read_every_token_and_the_last_attention_map_keep_it_whole(query_log):
    x = torch.randn(2, 3, 32, 32)
    for pool in ("avg", "map"):
        query_log.clear()
        with torch.no_grad():
            _model(global_pool=pool).eval()(x)
        assert query_log == [None, None, None], pool
    model = _model().eval()
    query_log.clear()
    with torch.no_grad():
        _, maps = model(x, return_attention=[-1])
    assert query_log == [None, None, None] and maps[2].shape == (2, 4, 17, 17)
    query_log.clear()
    with torch.no_grad():
        _, maps = model(x, return_attention=[0])
    assert query_log == [None, None, 1] and maps[0].shape == (2, 4, 17, 17)


@pytest.mark.parametrize("path", ["module", "fast"])
@pytest.mark.parametrize("extras", [{}, dict(init_values=0.1), dict(qk_norm=True)])
def test_block_with_rows_returns_the_first_rows_of_the_full_block(path, extras):
    block = _model(**extras).blocks[0].eval()
    x = torch.randn(2, 17, 64)
    if path == "fast":
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            plan = block_plan(block)
            if plan is None:
                pytest.skip("this torch build lacks the oneDNN packed-weight ops")
            full = run_plan(plan, x.bfloat16())
            part = run_plan(plan, x.bfloat16(), rows=3)
        torch.testing.assert_close(part.float(), full[:, :3].float(), rtol=2e-2, atol=2e-2)
        return
    with torch.no_grad():
        full, _ = block(x)
        part = block_forward(block, x, rows=3)
    assert part.shape == (2, 3, 64)
    torch.testing.assert_close(part, full[:, :3], rtol=1e-5, atol=1e-5)
