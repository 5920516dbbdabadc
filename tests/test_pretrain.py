"""Masked-autoencoder pretraining: the masking, the loss, the decoder, and whole runs on digits and on a folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.data.sources import UNLABELLED, DataSourceError, load_source
from vitkit.pretrain import MaskedAutoencoder, PretrainConfig, pretrain
from vitkit.pretrain.mae import hide_pixels, masked_patch_loss, patchify, random_masking, unpatchify, visible_count
from vitkit.train.checkpoint import load_checkpoint

from .conftest import noise_rgb, run_vitkit, tiny_model, write_png


def tiny_pretrain_config(out, **overrides) -> PretrainConfig:
    """A seconds-long pretraining run on scikit-learn's digits: a 2-block encoder, a 1-block decoder."""
    base = dict(
        data="digits",
        out=str(out),
        model="vit_digits_patch2_8",
        model_kwargs=dict(embed_dim=32, depth=2, num_heads=2),
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
        batch_size=64,
        epochs=1,
        lr=2e-3,
        progress=False,
        threads=1,
    )
    return PretrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------- masking
def test_masking_keeps_the_ratio_and_splits_the_patches_in_two():
    keep, hidden = random_masking(6, 64, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (6, visible_count(64, 0.75)) == (6, 16)
    assert hidden.shape == (6, 64) and hidden.sum(1).tolist() == [48] * 6
    for row_keep, row_hidden in zip(keep, hidden):
        visible = set(row_keep.tolist())
        assert len(visible) == 16  # no patch kept twice
        assert visible.isdisjoint(set(row_hidden.nonzero().flatten().tolist()))  # the kept are not hidden ...
        assert (~row_hidden).nonzero().flatten().tolist() == sorted(visible)  # ... and all the others are
    assert len({tuple(k.tolist()) for k in keep}) == 6  # each image draws its own mask


def test_masking_is_seeded():
    a, _ = random_masking(4, 16, 0.75, torch.Generator().manual_seed(1))
    b, _ = random_masking(4, 16, 0.75, torch.Generator().manual_seed(1))
    c, _ = random_masking(4, 16, 0.75, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d, _ = random_masking(4, 16, 0.75)  # the global generator: what a checkpoint saves and a resume restores
    torch.manual_seed(3)
    assert torch.equal(d, random_masking(4, 16, 0.75)[0])


# ---------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_counts_only_the_hidden_patches(norm_pix):
    torch.manual_seed(0)
    target = torch.randn(2, 16, 12)
    _, hidden = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0))
    perfect = target.clone()
    if norm_pix:  # the model predicts each patch normalised by its own statistics
        perfect = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    wrong_where_visible = torch.where(hidden.unsqueeze(-1), perfect, perfect + 5.0)
    assert masked_patch_loss(wrong_where_visible, target, hidden, norm_pix).item() == pytest.approx(0.0, abs=1e-6)
    wrong_where_hidden = torch.where(hidden.unsqueeze(-1), perfect + 1.0, perfect)
    assert masked_patch_loss(wrong_where_hidden, target, hidden, norm_pix).item() == pytest.approx(1.0, rel=1e-5)


def test_patchify_round_trips_in_token_order():
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    patches = patchify(images, (4, 4))  # (B, 2*3, 4*4*3)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(patches[0, 1].reshape(4, 4, 3).permute(2, 0, 1), images[0, :, 0:4, 4:8])  # row-major
    assert torch.equal(unpatchify(patches, (4, 4), (2, 3), 3), images)


# ------------------------------------------------------------------------------------------ the autoencoder
@pytest.mark.parametrize("model_kwargs", [{}, {"stem": "conv"}, {"class_token": False, "global_pool": "avg"}])
def test_decoder_predicts_every_patch_from_the_visible_tokens_only(model_kwargs):
    encoder = tiny_model(num_classes=0, **model_kwargs)  # 32 px, patch 8: 16 patches
    mae = MaskedAutoencoder(encoder, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    seen = []
    encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    x = torch.randn(3, 3, 32, 32)
    keep, hidden = random_masking(3, mae.num_patches, 0.75, torch.Generator().manual_seed(0))
    pred = mae.predict(x, keep, hidden)
    assert pred.shape == (3, 16, 8 * 8 * 3)
    assert seen == [(3, encoder.num_prefix_tokens + 4, 32)]  # the encoder ran on the 4 visible patches
    loss = mae(x)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the loss reaches the encoder ...
    assert mae.decoder.mask_token.grad.abs().sum() > 0  # ... and the decoder's stand-in for hidden patches


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_hidden_pixels_cannot_reach_the_prediction(stem):
    # a conv tokenizer's receptive field spans neighbouring patches: the hidden ones must be zeroed before it
    mae = MaskedAutoencoder(tiny_model(num_classes=0, stem=stem), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    mae.eval()
    x = torch.randn(2, 3, 32, 32)
    keep, hidden = random_masking(2, mae.num_patches, 0.75, torch.Generator().manual_seed(0))
    pixels_hidden = unpatchify(hidden.unsqueeze(-1).expand(-1, -1, 8 * 8 * 3).float(), (8, 8), (4, 4), 3).bool()
    changed = torch.where(pixels_hidden, torch.randn_like(x) * 5, x)  # only the hidden patches' pixels differ
    assert torch.allclose(mae.predict(x, keep, hidden), mae.predict(changed, keep, hidden), atol=1e-5)
    assert hide_pixels(x, hidden, (8, 8))[pixels_hidden].abs().max() == 0


def test_grad_checkpointing_gives_the_same_gradients():
    mae = MaskedAutoencoder(tiny_model(num_classes=0), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        mae.zero_grad()
        mae.set_grad_checkpointing(checkpointing)
        mae(x, generator=torch.Generator().manual_seed(0)).backward()
        grads.append(mae.encoder.blocks[0].mlp.fc1.weight.grad.clone())
    assert mae.encoder.grad_checkpointing and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_reconstruction_keeps_the_visible_patches():
    mae = MaskedAutoencoder(tiny_model(num_classes=0), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.randn(2, 3, 32, 32)
    recon, hidden, _ = mae.reconstruct(x, torch.Generator().manual_seed(0))
    same = patchify(recon, (8, 8)).isclose(patchify(x, (8, 8)), atol=1e-5).all(-1)  # (B, N) patch unchanged
    assert torch.equal(same, ~hidden)


# -------------------------------------------------------------------------------------------------- runs
def test_pretraining_writes_an_encoder_that_the_other_verbs_take(tmp_path, single_thread):
    from vitkit.infer.embed import embed_array
    from vitkit.train import finetune

    res = pretrain(tiny_pretrain_config(tmp_path / "mae", epochs=2))
    assert res.finished and res.model_path == tmp_path / "mae" / "model.safetensors"
    records = [json.loads(r) for r in (tmp_path / "mae" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if r["kind"] in ("val", "final")]  # epoch 1's, then the end's
    assert len(val) == 2 and val[-1] == res.val_raw["loss"] > 0  # the reconstruction loss of the held-out images
    state = load_checkpoint(tmp_path / "mae" / "last.ckpt")
    assert any(k.startswith("decoder.") for k in state["model"])  # last.ckpt holds the decoder too

    encoder = vitkit.from_pretrained(res.model_path)
    assert encoder.cfg.num_classes == 0 and encoder.cfg.embed_dim == 32 and encoder.cfg.in_chans == 1
    trained = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    assert all(torch.equal(v, state["model"][k]) for k, v in trained.items())  # the saved encoder is the trained one
    digits = load_source("digits", progress=False)
    assert embed_array(encoder, digits.images[:5]).shape == (5, 32)

    tuned = finetune(res.model_path, "digits", out=tmp_path / "ft", epochs=1, batch_size=64, progress=False)
    assert tuned.val_top1 is not None and vitkit.from_pretrained(tuned.model_path).cfg.num_classes == 10


def test_pretraining_draws_the_reconstructions(tmp_path, single_thread):
    res = pretrain(tiny_pretrain_config(tmp_path / "mae", epochs=2))
    png = Image.open(res.out_dir / "reconstruction.png")
    assert png.mode == "RGB" and png.width > png.height  # eight images wide, four rows high
    history = sorted(p.name for p in (res.out_dir / "reconstructions").iterdir())
    assert history == [f"step_{s:07d}.png" for s in (res.steps // 2, res.steps)]  # each epoch (the end: again)
    grid = np.asarray(png)
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 16  # images drawn, not a blank canvas


def test_pretraining_resumes_bit_identically(tmp_path, single_thread):
    """Every random part on (masks, drop path, pad-and-crop, flips), accumulation, and a reconstruction drawn at each
    epoch end: the resumed run must match the straight one."""
    model_kwargs = dict(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)
    kw = dict(epochs=2, grad_accum=2, augment=dict(random_crop_pad=1, hflip=True), model_kwargs=model_kwargs)
    straight = pretrain(tiny_pretrain_config(tmp_path / "straight", **kw))
    assert straight.finished and straight.steps == 2 * (1707 // 32 // 2)  # 95 % of 1,797 digits, 26 steps an epoch

    half = pretrain(tiny_pretrain_config(tmp_path / "resumed", stop_after_steps=37, **kw))
    assert not half.finished and half.steps == 37
    resumed = pretrain(tiny_pretrain_config(tmp_path / "resumed", **kw))
    assert resumed.finished and resumed.steps == straight.steps

    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert straight.val_raw["loss"] == resumed.val_raw["loss"]


# ------------------------------------------------------------------------------------------ unlabelled data
def _flat_folder(root, count=40):
    root.mkdir()
    for i in range(count):
        write_png(root / f"img_{i:03d}.png", noise_rgb(16, 16, seed=i))
    return root


def test_a_folder_without_class_folders_is_one_unlabelled_class(tmp_path):
    folder = _flat_folder(tmp_path / "photos")
    with pytest.raises(DataSourceError, match="directly in the top folder"):
        load_source(str(folder), cache_dir=tmp_path / "cache", progress=False)
    ds = load_source(str(folder), cache_dir=tmp_path / "cache", progress=False, unlabelled_ok=True)
    assert len(ds) == 40 and ds.classes == [UNLABELLED] and set(ds.labels.tolist()) == {0}
    with pytest.raises(DataSourceError, match="directly in the top folder"):  # now cached: still refused for labels
        load_source(str(folder), cache_dir=tmp_path / "cache", progress=False)
    labelled = load_source("digits", progress=False, unlabelled_ok=True)
    assert labelled.classes == [str(i) for i in range(10)]  # labelled data keeps its labels


def test_pretraining_on_an_unlabelled_folder(tmp_path, single_thread):
    folder = _flat_folder(tmp_path / "photos")
    cfg = tiny_pretrain_config(
        tmp_path / "mae",
        data=str(folder),
        cache_dir=str(tmp_path / "cache"),
        model="vit_cifar_patch4_32",
        image_size=16,
        batch_size=16,
        val_split=0.1,
    )
    res = pretrain(cfg)  # 36 images to train on, 4 held out
    assert res.finished and res.steps == 2 and res.val_raw["n"] == 4
    assert vitkit.from_pretrained(res.model_path).cfg.img_size == (16, 16)
    assert (res.out_dir / "reconstruction.png").is_file()


# ---------------------------------------------------------------------------------------------------- CLI
def test_pretrain_cli_then_plot(tmp_path):
    out = tmp_path / "run"
    flags = ["--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2", "--threads", "1"]
    r = run_vitkit(["pretrain", "--data", "digits", "--epochs", "1", "--out", str(out), "--no-progress", *flags])
    assert r.returncode == 0, r.stderr
    assert "encoder:" in r.stdout and (out / "model.safetensors").is_file()
    (out / "reconstruction.png").unlink()
    r = run_vitkit(["plot", str(out)])
    assert r.returncode == 0, r.stderr
    assert (out / "curves.png").is_file() and (out / "reconstruction.png").is_file()
    image = write_png(tmp_path / "noise.png", noise_rgb(8, 8))
    r = run_vitkit(["explain", str(out / "model.safetensors"), image, "--out", str(tmp_path / "maps")])
    assert r.returncode == 0, r.stderr  # a headless encoder: attention maps, no class
    assert (tmp_path / "maps" / "noise_attention.png").is_file()
    r = run_vitkit(["predict", str(out / "model.safetensors"), image])
    assert r.returncode == 1 and "no head" in r.stderr  # nothing to predict: says what to do instead


def test_pretrain_flags():
    import argparse

    from vitkit.commands import pretrain as pretrain_command

    parser = argparse.ArgumentParser()
    pretrain_command.add_arguments(parser)
    help_text = parser.format_help()
    for flag in ("--mask-ratio", "--decoder-dim", "--decoder-depth", "--decoder-heads", "--norm-pix-loss", "--minutes"):
        assert flag in help_text
    for flag in ("--mixup", "--cutmix", "--ema-decay", "--label-smoothing", "--layer-decay"):
        assert flag not in help_text
    with pytest.raises(ValueError, match="mask_ratio"):
        PretrainConfig(data="digits", mask_ratio=1.0)
