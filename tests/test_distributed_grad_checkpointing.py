"""Activation (gradient) checkpointing: the same loss and gradients as a plain backward, for less memory."""

import copy

import torch

import vitkit

from .conftest import tiny_kwargs


def _loss_and_grads(model, x, y):
    torch.manual_seed(123)  # dropout / drop-path draw the same masks in both runs (checkpoint replays the RNG)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_gives_same_loss_and_gradients():
    model = vitkit.create_model("S/16", **tiny_kwargs(depth=3, drop_path_rate=0.2, proj_drop_rate=0.1)).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss_a, grads_a = _loss_and_grads(model, x, y)
    loss_b, grads_b = _loss_and_grads(ckpt, x, y)
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing_is_off_in_eval_and_keeps_attention_maps():
    model = vitkit.create_model("S/16", **tiny_kwargs())
    model.set_grad_checkpointing(True)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    logits, maps = model(x, return_attention="all")
    assert logits.shape == (2, 5) and sorted(maps) == [0, 1]
    model.train()
    logits, maps = model(x, return_attention=[-1])  # the asked layer runs plainly, the others are checkpointed
    assert maps[1].shape == (2, 4, 17, 17)
    logits.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward during one forward (what checkpointing is meant to cut)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()  # outside the hooks: the recomputation in backward is not counted
    return total


def test_grad_checkpointing_keeps_fewer_activations():
    model = vitkit.create_model("S/16", **tiny_kwargs(depth=4)).train()
    x = torch.randn(4, 3, 32, 32)
    plain = _saved_bytes(model, x)
    model.set_grad_checkpointing(True)
    assert _saved_bytes(model, x) < plain / 2
