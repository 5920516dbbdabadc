"""The CPU bf16 inference fast path (vitkit/fast: packing.py, inference.py): it engages only where it should, its logits
stay within bf16 tolerance of the fp32 reference, its packed weights follow weight updates, and nothing else
about the model changes (training, fp32, state_dict, attention maps, deepcopy)."""

import copy

import pytest
import torch

import vitkit
from vitkit.fast import packing as fast_inference
from vitkit.fast.inference import packed_patch_embed

from .conftest import tiny_kwargs

needs_kernels = pytest.mark.skipif(not fast_inference.available(), reason="no oneDNN bf16 linear kernels here")


def _model(**kw):
    return vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(depth=4, embed_dim=64, **kw)).eval()


def _packed_layers(model):
    return fast_inference.packed_layers(model)


def _bf16(model, x, **kw):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x, **kw)


@needs_kernels
@pytest.mark.parametrize("extras", [{}, dict(init_values=1e-1, reg_tokens=2), dict(global_pool="map")])
def test_logits_within_bf16_tolerance_of_fp32_and_of_the_ordinary_bf16_path(extras):
    model = _model(**extras)
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    fast = _bf16(model, x)
    with fast_inference.disabled():
        ordinary = _bf16(model, x)
    assert _packed_layers(model), "the fast path did not engage"
    assert fast.dtype == ordinary.dtype == torch.bfloat16  # what autocast returns either way
    scale = ref.abs().max()
    assert (fast.float() - ref).abs().max() <= 0.03 * scale
    assert (fast.float() - ordinary.float()).abs().max() <= 0.03 * scale
    assert not torch.equal(fast.float(), ordinary.float())  # it really is a different path


def test_fp32_is_exact_and_never_packs():
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        out = model(x)
        with fast_inference.disabled():
            ref = model(x)
    assert torch.equal(out, ref) and not _packed_layers(model)


def test_training_and_grad_mode_take_the_ordinary_path():
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        model(x).float().sum().backward()  # training: autograd through the ordinary ops
        model.eval()
        y = model(x)  # eval but grad enabled: still differentiable
    assert y.requires_grad and model.head.weight.grad is not None
    assert not _packed_layers(model)


@needs_kernels
def test_weight_update_invalidates_the_packed_copy():
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    before = _bf16(model, x)
    with torch.no_grad():
        model.head.weight.mul_(2.0)  # in place: bumps the version counter
        model.head.bias.add_(1.0)
    after = _bf16(model, x)
    with fast_inference.disabled():
        ordinary = _bf16(model, x)
    assert (after.float() - ordinary.float()).abs().max() <= 0.03 * ordinary.float().abs().max()
    assert (after.float() - before.float()).abs().max() > 0.5

    other = _model()  # load_state_dict copies in place too
    model.load_state_dict(other.state_dict())
    assert (_bf16(model, x).float() - _bf16(other, x).float()).abs().max() <= 1e-6

    # writes through .data bypass version counters: clear_cache is the documented way out
    model.head.weight.data.zero_()
    model.head.bias.data.zero_()
    fast_inference.clear_cache(model)
    assert _bf16(model, x).abs().max() == 0


@needs_kernels
@pytest.mark.parametrize("optimizer", ["sgd", "fused_adamw"])  # fused AdamW does not bump version counters
def test_a_training_step_in_between_is_seen(optimizer):
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    _bf16(model, x)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()
    model(x).sum().backward()
    opt.step()
    model.eval()
    with fast_inference.disabled():
        ordinary = _bf16(model, x)
    assert (_bf16(model, x).float() - ordinary.float()).abs().max() <= 0.03 * ordinary.float().abs().max()


@needs_kernels
def test_state_dict_deepcopy_and_pickle_are_unchanged():
    model = _model()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    _bf16(model, x)
    assert _packed_layers(model)
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], v) for k, v in keys.items())
    twin = copy.deepcopy(model)  # the packed copies are opaque oneDNN tensors: not copied, rebuilt on use
    assert not _packed_layers(twin)
    assert torch.equal(_bf16(twin, x), _bf16(model, x))


@needs_kernels
def test_return_attention_and_no_grad_after_inference_mode():
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    logits, maps = _bf16(model, x, return_attention=[0, -1])
    assert set(maps) == {0, 3} and maps[0].shape == (2, 4, 17, 17)
    assert torch.allclose(maps[0].float().sum(-1), torch.ones(2, 4, 17), atol=0.02)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # cache built under inference_mode
        again = model(x)
    assert (again.float() - logits.float()).abs().max() <= 0.03 * logits.float().abs().max()


@needs_kernels
def test_low_precision_copy_uses_the_fast_path():
    from vitkit.model.precision import low_precision_inference

    model = _model()
    fast = low_precision_inference(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    assert _packed_layers(fast) and (out - ref).abs().max() <= 0.03 * ref.abs().max()


def test_without_the_kernels_everything_takes_the_ordinary_path(monkeypatch):
    model = _model()
    x = torch.randn(4, 3, 32, 32)
    with fast_inference.disabled():
        ref = _bf16(model, x)
    monkeypatch.setattr(fast_inference, "_available", False)  # as on a torch build without the private ops
    assert torch.equal(_bf16(model, x), ref) and not _packed_layers(model)


@needs_kernels
def test_patch_embedding_as_a_packed_matmul_matches_the_conv():
    from vitkit.model.layers import PatchEmbed

    pe = PatchEmbed((4, 4), 3, 32).eval()
    x = torch.randn(2, 3, 18, 17)  # not a multiple of the patch: the conv drops the remainder, so must the matmul
    with torch.inference_mode():
        ref = pe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = packed_patch_embed(pe, x)
    assert out.shape == ref.shape == (2, 32, 4, 4)
    assert fast_inference.packed_layers(pe) == [pe.proj]
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()


@needs_kernels
def test_residual_rides_on_the_matmul_and_matches_the_separate_add():
    layer = torch.nn.Linear(16, 8).eval()
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 8)
    with torch.inference_mode():
        ref = r + layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = fast_inference.linear(layer, x, residual=r.bfloat16())
            with pytest.raises(ValueError, match="residual"):
                fast_inference.linear(layer, x, activation="gelu", residual=r)
    assert fused.dtype == torch.bfloat16 and (fused.float() - ref).abs().max() <= 0.05 * ref.abs().max()


@needs_kernels
def test_straight_line_block_matches_the_module_path_and_hooks_still_fire():
    """Without hooks a block on the fast path runs as straight-line calls; a hook anywhere in the block sends it
    through the modules (so the hook fires), with the same logits up to bf16 rounding (no fused adds there)."""
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    lean = _bf16(model, x)
    seen = []
    handle = model.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked = _bf16(model, x)
    handle.remove()
    assert seen == [(2, 17, 256)]  # (B, 1 + 16 patches, 4 * 64)
    assert (lean.float() - hooked.float()).abs().max() <= 0.03 * hooked.float().abs().max()


@needs_kernels
def test_block_plan_follows_swapped_modules_and_parameters():
    """Each block gathers its packed weights once (a plan keyed by its modules and parameters); replacing a layer or
    a parameter, or adding a hook after the plan exists, is seen on the next call."""
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    _bf16(model, x)
    blk = model.blocks[2]
    assert blk in _packed_layers(model)  # the block's plan sits in the same table as the packed layers

    def agrees_with_the_ordinary_path():
        with fast_inference.disabled():
            ordinary = _bf16(model, x).float()
        fast = _bf16(model, x).float()
        return (fast - ordinary).abs().max() <= 0.03 * ordinary.abs().max()

    before = _bf16(model, x)
    new_fc1 = torch.nn.Linear(64, 256)
    torch.nn.init.normal_(new_fc1.weight, std=0.5)
    blk.mlp.fc1 = new_fc1.eval()  # a fresh module under the block
    swapped = _bf16(model, x)
    assert (swapped.float() - before.float()).abs().max() > 1e-3 and agrees_with_the_ordinary_path()

    blk.attn.proj.weight = torch.nn.Parameter(torch.randn(64, 64))  # a fresh parameter on a kept module
    assert agrees_with_the_ordinary_path()

    blk.mlp.fc2.weight.data = torch.randn(64, 256)  # new storage through .data (the version counter stays)
    assert agrees_with_the_ordinary_path()

    seen = []  # a hook on a module the straight-line path never calls (dropout) still fires
    handle = blk.mlp.drop1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _bf16(model, x)
    handle.remove()
    handle = blk.attn.qkv.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape))
    _bf16(model, x)
    handle.remove()
    assert seen == [(2, 17, 256), (2, 17, 64)]


@needs_kernels
def test_qk_norm_block_on_the_fast_path_matches_the_ordinary_path():
    model = _model(qk_norm=True)
    for blk in model.blocks:  # non-trivial q/k norms
        torch.nn.init.normal_(blk.attn.q_norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(blk.attn.k_norm.bias, 0.0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    fast = _bf16(model, x).float()
    with fast_inference.disabled():
        ordinary = _bf16(model, x).float()
    assert model.blocks[0] in _packed_layers(model)
    assert (fast - ordinary).abs().max() <= 0.03 * ordinary.abs().max()


@needs_kernels
def test_cached_plans_do_not_keep_a_model_alive():
    import gc
    import weakref

    model = _model()
    _bf16(model, torch.randn(1, 3, 32, 32))
    blocks = [weakref.ref(b) for b in model.blocks]
    del model
    gc.collect()
    assert all(r() is None for r in blocks)


@needs_kernels
def test_layerscale_folds_into_the_matmul_and_follows_gamma():
    """LayerScale blocks (DINOv2, DeiT-III) take the straight-line path with gamma folded into proj / fc2."""
    model = _model(init_values=0.5)
    for blk in model.blocks:
        torch.nn.init.normal_(blk.ls1.gamma, 0.5, 0.3)
        torch.nn.init.normal_(blk.ls2.gamma, 0.5, 0.3)
    x = torch.randn(2, 3, 32, 32)

    def fast_and_ordinary():
        fast = _bf16(model, x).float()
        with fast_inference.disabled():
            ordinary = _bf16(model, x).float()
        assert (fast - ordinary).abs().max() <= 0.03 * ordinary.abs().max()
        return fast

    before = fast_and_ordinary()
    assert all(blk in _packed_layers(model) for blk in model.blocks)
    with torch.no_grad():
        model.blocks[1].ls2.gamma.mul_(-2.0)
    after = fast_and_ordinary()
    assert (after - before).abs().max() > 1e-3


@needs_kernels
@pytest.mark.parametrize("extras", [{}, dict(init_values=0.5)])
def test_projections_packed_for_few_rows_match_and_are_used_only_in_their_row_range(monkeypatch, extras):
    """ROW_PACKED_PROJECTIONS: for a listed width, proj and fc2 carry a second packing used for inputs of lo..hi
    rows; the logits stay those of the ordinary path, and other row counts take the default packing."""
    x = torch.randn(2, 3, 32, 32)  # 2 x 17 = 34 rows in every block but the last (2 rows: the class tokens)
    state = _model(**extras).state_dict()

    def built(rows):
        if rows is not None:
            monkeypatch.setitem(fast_inference.ROW_PACKED_PROJECTIONS, 64, rows)
        model = _model(**extras)
        model.load_state_dict(state)
        return model, _bf16(model, x).float()

    model, _ = built(None)  # width 64 is not in the table
    assert fast_inference._packed[model.blocks[0]][1].few_rows is None
    with fast_inference.disabled():
        ordinary = _bf16(model, x).float()

    for rows, used in [((10, 100), True), ((100, 200), False)]:
        model, fast = built(rows)
        assert (fast - ordinary).abs().max() <= 0.03 * ordinary.abs().max()
        for blk in model.blocks:  # the few-rows copies swapped for zero weights: seen only where they are used
            key, plan = fast_inference._packed[blk]
            assert plan.few_rows[0] == rows
            zero = lambda m: fast_inference.pack(torch.zeros_like(m.weight), None)  # noqa: E731
            fast_inference._packed[blk] = (key, plan._replace(few_rows=(rows, zero(blk.attn.proj), zero(blk.mlp.fc2))))
        changed = (_bf16(model, x).float() - fast).abs().max() > 1e-2
        assert changed == used
