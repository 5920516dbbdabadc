"""Sequence pooling (`global_pool="seqpool"`, CCT): softmax(Linear(D, 1)) weights over the patch tokens, their weighted
sum pooled; its weights (`attn_pool.score`) save, load, reset and train like the rest of the model, and every path
that pools (forward, forward_head(pre_logits=True), bf16 inference) pools this way."""

import pytest
import torch

from vitkit.interop import from_pretrained
from vitkit.model import load_model
from vitkit.model.layers import SequencePool
from vitkit.model.serialization import ExportError

from .conftest import tiny_model


def _seqpool_model(**kw):
    return tiny_model(global_pool="seqpool", class_token=False, **kw).eval()


def test_weights_sum_to_one_and_the_pool_is_their_weighted_sum():
    pool = SequencePool(8)
    torch.nn.init.normal_(pool.score.weight)
    x = torch.randn(3, 5, 8)
    w = pool.weights(x)
    assert w.shape == (3, 5)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert not torch.allclose(w, torch.full_like(w, 0.2))  # not an average in disguise
    torch.testing.assert_close(pool(x), (w.unsqueeze(-1) * x).sum(dim=1))


def test_shapes_parameter_names_and_pre_logits():
    model = _seqpool_model(reg_tokens=2)
    assert isinstance(model.attn_pool, SequencePool)
    assert {"attn_pool.score.weight", "attn_pool.score.bias"} <= set(model.state_dict())
    assert not model.cfg.use_fc_norm  # the final norm runs before the pool, as in CCT
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 2 registers + 16 patches, D)
        feats = model.forward_head(tokens, pre_logits=True)
        logits = model(x)
    assert tokens.shape == (2, 18, 32) and feats.shape == (2, 32) and logits.shape == (2, 5)
    patches = tokens[:, 2:]  # the registers are not pooled
    want = (model.attn_pool.weights(patches).unsqueeze(-1) * patches).sum(dim=1)
    torch.testing.assert_close(feats, want)
    torch.testing.assert_close(logits, model.head(want))


def test_the_unknown_pool_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="seqpool"):
        tiny_model(global_pool="seq")


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = _seqpool_model()
    torch.nn.init.normal_(model.attn_pool.score.weight)
    path = model.save(tmp_path / "m.safetensors")
    for loaded in (load_model(path), from_pretrained(str(path))):
        assert loaded.cfg.global_pool == "seqpool" and isinstance(loaded.attn_pool, SequencePool)
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), loaded.eval()(x))


def test_a_bare_state_dict_loads_as_seqpool(tmp_path):
    """A foreign-format load (no vitkit metadata) tells the pooling from its tensors, as it does for "map"."""
    model = _seqpool_model()
    torch.nn.init.normal_(model.attn_pool.score.weight)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = from_pretrained(str(tmp_path / "m.pth"), num_heads=4).eval()
    assert loaded.cfg.global_pool == "seqpool" and not loaded.cfg.use_fc_norm
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_timm_export_is_refused():
    with pytest.raises(ExportError, match="sequence pooling"):
        _seqpool_model().save_pretrained("unused", format="timm")


def test_reset_classifier_switches_pooling_both_ways():
    model = tiny_model(global_pool="avg", class_token=False)
    model.reset_classifier(3, global_pool="seqpool")
    assert isinstance(model.attn_pool, SequencePool) and model.cfg.global_pool == "seqpool"
    assert model.attn_pool.score.weight.std() > 0 and not model.attn_pool.score.bias.any()
    assert model.cfg.use_fc_norm  # the trained norm stays where it was (after the pool), as timm's reset does
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model.reset_classifier(4, global_pool="avg")
    assert model.attn_pool is None and not any(k.startswith("attn_pool.") for k in model.state_dict())


def test_bf16_inference_pools_every_token():
    """pooled_only forwards may shorten the last block to the rows the pool reads ("token" pooling): seqpool reads
    them all, so the bf16 forward matches pooling the full token sequence."""
    model = _seqpool_model(depth=2)
    torch.nn.init.normal_(model.attn_pool.score.weight, std=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        ref = model.forward_head(model.forward_features(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x)
            full = model.forward_head(model.forward_features(x))
    assert (fast.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    torch.testing.assert_close(fast.float(), full.float())


def test_a_training_step_reaches_the_pool_weights():
    model = _seqpool_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.attn_pool.score.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.attn_pool.score.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(model.attn_pool.score.weight, before)
