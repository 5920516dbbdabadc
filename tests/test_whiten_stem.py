"""Patch-whitening initialisation of the conv tokenizer's first layer (`whiten_stem`, vitkit/train/whiten.py): the
+V filters turn the patches into (near-)identity-covariance outputs, the -V filters mirror them, the option is
refused where there is no conv tokenizer or no fresh start, and a resumed run keeps its weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.train import build, fit
from vitkit.train.checkpoint import load_checkpoint
from vitkit.train.options import add_training_arguments, overrides_from_args
from vitkit.train.whiten import WHITEN_EPS, patch_covariance, whiten_conv

from .conftest import tiny_digits_config


def correlated_images(n: int = 64, size: int = 12) -> torch.Tensor:
    """Noise blurred over space and mixed over channels: patches whose covariance is far from the identity."""
    x = torch.randn(n, 3, size + 2, size + 2)
    x = F.avg_pool2d(x, 3, stride=1)  # neighbouring pixels correlate
    mix = torch.tensor([[1.0, 0.5, 0.2], [0.0, 1.0, 0.5], [0.0, 0.0, 0.3]])
    return torch.einsum("oc,bchw->bohw", mix, x) + 0.5


def unfolded(images: torch.Tensor, k: int = 3) -> torch.Tensor:
    return F.unfold(images, k).transpose(1, 2).reshape(-1, images.shape[1] * k * k)  # (patches, d)


def test_patch_covariance_is_the_covariance_of_the_unfolded_patches_in_any_batching():
    x = correlated_images(10)
    want = torch.cov(unfolded(x).double().T)
    torch.testing.assert_close(patch_covariance([x], (3, 3)), want, atol=1e-6, rtol=1e-5)  # fp32 products
    torch.testing.assert_close(patch_covariance([x[:3], x[3:]], (3, 3)), want, atol=1e-6, rtol=1e-5)


def test_the_plus_half_whitens_the_patches_and_the_minus_half_mirrors_it():
    x = correlated_images()
    conv = nn.Conv2d(3, 32, 3, padding=1, bias=False)  # 27-dim patches, 32 filters: the top 16 eigenvectors, +-
    assert whiten_conv(conv, [x]) == 32
    w = conv.weight.detach()
    torch.testing.assert_close(w[16:], -w[:16])
    out = F.conv2d(x, w[:16]).permute(0, 2, 3, 1).reshape(-1, 16).double()  # every patch position
    cov = torch.cov(out.T)
    eigenvalues = torch.linalg.eigvalsh(patch_covariance([x], (3, 3))).flip(0)[:16]
    torch.testing.assert_close(cov, torch.diag(eigenvalues / (eigenvalues + WHITEN_EPS)), atol=1e-4, rtol=1e-4)
    assert (cov - torch.eye(16, dtype=cov.dtype)).abs().max() < 0.05  # near-identity: eps only shrinks small ones


@pytest.mark.parametrize("out_channels, whitened", [(64, 54), (33, 33), (1, 1)])
def test_as_many_filters_as_fit(out_channels, whitened):
    conv = nn.Conv2d(3, out_channels, 3, bias=False)
    before = conv.weight.detach().clone()
    assert whiten_conv(conv, [correlated_images(8)]) == whitened
    assert not torch.equal(conv.weight[:whitened], before[:whitened])
    assert torch.equal(conv.weight[whitened:], before[whitened:])  # more filters than 2 x 27: kept as initialised


def test_the_flag_sets_the_option():
    import argparse

    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    assert overrides_from_args(parser.parse_args(["--whiten-stem"]))["whiten_stem"] is True


def test_a_patch_stem_is_refused(tmp_path):
    with pytest.raises(ValueError, match="stem: conv"):
        fit(tiny_digits_config(tmp_path, whiten_stem=True, epochs=1))


def conv_stem_run(out, **kw):
    """Digits (8 px, one channel) on a conv-tokenizer ViT with whiten_stem: its first conv is 1 -> 32 channels."""
    model_kwargs = dict(embed_dim=32, depth=1, num_heads=2, stem="conv")
    base = dict(epochs=1, batch_size=64, warmup_epochs=0.5, whiten_stem=True, model_kwargs=model_kwargs)
    return tiny_digits_config(out, **{**base, **kw})


def test_a_fresh_model_is_whitened_without_touching_the_random_state(tmp_path):
    cfg = conv_stem_run(tmp_path)
    data = build.load_run_data(cfg, build.DistEnv())
    model = build.build_or_restore_model(cfg, data, None)
    after_whitened = torch.get_rng_state()
    plain = build.build_or_restore_model(conv_stem_run(tmp_path, whiten_stem=False), data, None)
    assert torch.equal(torch.get_rng_state(), after_whitened)  # the rest of the run draws what it would have drawn
    first = model.patch_embed.stem[0].weight.detach()
    assert first.shape == (32, 1, 3, 3)  # 1 channel x 3 x 3 = 9 dims: all 9 eigenvectors, +-
    torch.testing.assert_close(first[9:18], -first[:9])
    assert torch.equal(first[18:], plain.patch_embed.stem[0].weight[18:])
    assert not torch.equal(first[:18], plain.patch_embed.stem[0].weight[:18])


def test_resume_does_not_whiten_again_and_stays_exact(tmp_path, monkeypatch, single_thread):
    straight = fit(conv_stem_run(tmp_path / "straight", stop_after_steps=4))
    half = fit(conv_stem_run(tmp_path / "resumed", stop_after_steps=2))
    assert half.steps == 2 and not half.finished
    monkeypatch.setattr(build, "whiten_conv", lambda conv, batches: pytest.fail("a resume whitened again"))
    resumed = fit(conv_stem_run(tmp_path / "resumed", stop_after_steps=4))
    assert resumed.steps == straight.steps == 4
    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
