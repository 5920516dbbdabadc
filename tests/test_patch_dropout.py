"""Patch dropout (`ViTConfig.patch_drop_rate`): in training the blocks see round((1 - rate) * N) of each image's N
patch tokens plus every prefix token; evaluation sees all of them, the weights do not change, and a rate of 0 leaves
the forward exactly as it was."""

import pytest
import torch

import vitkit
from vitkit.config import ViTConfig

from .conftest import tiny_kwargs

GRID = 16  # tiny_kwargs: 32 px images, 8 px patches -> 4 x 4 patch tokens


def _model(rate: float = 0.0, seed: int = 0, **kw) -> vitkit.VisionTransformer:
    torch.manual_seed(seed)
    return vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(patch_drop_rate=rate, **kw))


def _tokens_entering_blocks(model: vitkit.VisionTransformer, x: torch.Tensor, call=None) -> torch.Tensor:
    """The tokens (B, N, D) the first block receives during `call(x)` (default: the forward)."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        (call or model)(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("prefix", [dict(), dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
def test_training_keeps_round_one_minus_rate_of_the_patches_and_every_prefix_token(stem, rate, prefix):
    model = _model(rate, stem=stem, **prefix)
    P = model.num_prefix_tokens
    x = torch.randn(3, 3, 32, 32)
    model.train()
    kept = round((1 - rate) * GRID)
    for call in (model, model.forward_features):
        assert _tokens_entering_blocks(model, x, call).shape[1] == P + kept
    model.eval()
    assert _tokens_entering_blocks(model, x).shape[1] == P + GRID
    assert _tokens_entering_blocks(model, x, model.forward_features).shape[1] == P + GRID


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_the_kept_tokens_are_the_drawn_patches_with_their_position_embedding(stem):
    model = _model(0.5, stem=stem, reg_tokens=1)
    P = model.num_prefix_tokens
    x = torch.randn(4, 3, 32, 32)
    model.train()  # the conv stem's BatchNorm normalises by the batch in training: the reference must too
    every_patch = torch.arange(GRID).expand(4, -1)
    every = _tokens_entering_blocks(model, x, lambda x: model.forward_features(x, keep=every_patch))  # (B, P + 16, D)
    torch.manual_seed(7)
    keep = model.patch_dropout_keep(x)
    assert keep.shape == (4, 8) and all(len(set(row.tolist())) == 8 for row in keep)  # 8 distinct patches each
    assert len({tuple(row.tolist()) for row in keep}) > 1  # each image draws its own subset
    torch.manual_seed(7)
    seen = _tokens_entering_blocks(model, x)
    patches = every[:, P:].gather(1, keep.unsqueeze(-1).expand(-1, -1, every.shape[-1]))
    assert torch.equal(seen, torch.cat([every[:, :P], patches], dim=1))


def test_rate_zero_leaves_the_training_forward_bit_identical_and_draws_nothing():
    model = _model(0.0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    model.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        out = model(x)
    assert torch.equal(torch.get_rng_state(), state)  # no random draw at all
    assert torch.equal(out, reference)


def test_evaluation_and_the_weights_do_not_depend_on_the_rate():
    plain, dropping = _model(0.0), _model(0.6)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dropping.state_dict().items()}
    dropping.load_state_dict(plain.state_dict())
    plain.eval(), dropping.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), dropping(x))


def test_a_training_step_with_patch_dropout_runs_under_bf16_autocast():
    model = _model(0.5).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss) and model.patch_embed.proj.weight.grad is not None


def test_intermediates_keep_the_whole_grid_in_training():
    model = _model(0.5).train()
    out = model.forward_intermediates(torch.randn(2, 3, 32, 32), indices=1)
    assert out.layers[0].patches.shape[-2:] == (4, 4)


def test_the_rate_survives_save_and_load(tmp_path):
    model = _model(0.25)
    model.save(tmp_path / "m.safetensors")
    assert vitkit.from_pretrained(tmp_path / "m.safetensors").cfg.patch_drop_rate == 0.25


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.5", True])
def test_a_rate_outside_zero_to_one_is_refused(bad):
    with pytest.raises(ValueError, match="patch_drop_rate"):
        ViTConfig(patch_drop_rate=bad)
