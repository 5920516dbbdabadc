"""Transfer: embeddings from a checkpoint (pooled and patch) and fine-tuning from a foreign checkpoint."""

import json
import math

import numpy as np
import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.data.decode import decode_image
from vitkit.data.preprocess import preprocess_image
from vitkit.infer.embed import embed_images

from .conftest import noise_rgb, tiny_kwargs, write_png


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"{i}.png", noise_rgb(40 + 8 * i, 36, seed=i))  # three sizes
    return folder


def test_embed_pooled_and_patch_features(tmp_path, images):
    model = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs(reg_tokens=1)).eval()
    ckpt = model.save(tmp_path / "m.safetensors")
    assert main(["embed", str(ckpt), str(images), "-o", str(tmp_path / "f.npy"), "--precision", "fp32"]) == 0
    feats = np.load(tmp_path / "f.npy")
    names = (tmp_path / "f.txt").read_text().split()
    assert feats.shape == (3, 32) and [n.rsplit("/", 1)[-1] for n in names] == ["0.png", "1.png", "2.png"]
    x = torch.stack([preprocess_image(decode_image(n), model.preprocess) for n in names])
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
    assert np.abs(feats - ref.numpy()).max() < 1e-5
    patches = embed_images(model, [decode_image(names[0])], patch=True, precision="bf16")
    assert patches.shape == (1, 16, 32)  # 4x4 patch grid, register and cls tokens dropped
    assert np.abs(patches[0] - model.forward_features(x[:1])[0, 2:].detach().numpy()).max() < 0.1


def test_prepare_for_transfer_new_zero_head_resampled_positions_and_probe(tmp_path):
    from vitkit.interop.transfer import prepare_for_transfer

    src = vitkit.create_model("vit_tiny_patch16_224", **tiny_kwargs())
    path = src.save(tmp_path / "m.safetensors")
    model = prepare_for_transfer(path, num_classes=3, img_size=48, freeze_backbone=True, labels=["a", "b", "c"])
    assert model.cfg.num_classes == 3 and model.cfg.img_size == (48, 48) and model.labels == ["a", "b", "c"]
    assert model.pos_embed.shape[1] == 1 + 36 and torch.equal(model.pos_embed[:, :1], src.pos_embed[:, :1])
    assert torch.count_nonzero(model.head.weight) == 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    same = prepare_for_transfer(path, num_classes=5)  # equal class count: still a new head
    assert torch.count_nonzero(same.head.weight) == 0 and all(p.requires_grad for p in same.parameters())


def _probe_train_loss(model) -> float:
    """Cross-entropy of `model`'s head on the probe's training rows (digits, the default 10 % held out, seed 0)."""
    from vitkit.data.sources import load_source, stratified_split
    from vitkit.infer.embed import embed_array

    ds = load_source("digits", progress=False)
    train_idx, _ = stratified_split(ds.labels, 0.1, 0)
    feats = torch.from_numpy(embed_array(model, ds.images[train_idx]))
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.head(feats), torch.from_numpy(ds.labels[train_idx])))


def test_fit_linear_head_returns_the_fitted_loss():
    """L-BFGS's `step` returns the loss before its first update; the probe must report the loss after fitting."""
    from vitkit.interop.transfer import fit_linear_head

    labels = torch.arange(60) % 3
    feats = torch.nn.functional.one_hot(labels, 3).float() * 4 + 0.3 * torch.randn(60, 3)  # separable classes
    head = torch.nn.Linear(3, 3)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)  # starting loss: log(3) = 1.0986
    loss = fit_linear_head(head, feats, labels)
    with torch.no_grad():
        fitted = float(torch.nn.functional.cross_entropy(head(feats), labels))
    assert loss == pytest.approx(fitted, rel=1e-5) and loss < 0.1 * math.log(3)


def test_finetune_full_and_linear_probe_on_digits(tmp_path, monkeypatch, capsys):
    from vitkit.train import finetune  # the Python API; `vitkit finetune` only parses flags and calls it

    assert finetune.__module__ == "vitkit.train.finetune"

    src = vitkit.create_model("vit_digits_patch2_8", num_classes=3, depth=1)
    src.labels = ["x", "y", "z"]
    src.preprocess.mean, src.preprocess.std = (0.5,), (0.5,)  # one channel (create_model's default has three)
    path = src.save(tmp_path / "src.safetensors")
    res = finetune(path, "digits", num_classes=10, out=tmp_path / "ft", epochs=0.3, batch_size=128, progress=False,
                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    model = vitkit.from_pretrained(res.model_path)
    assert model.cfg.num_classes == 10 and len(model.labels) == 10 and res.val_top1 is not None
    assert not torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)  # the encoder trained

    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    assert main(["finetune", "--from", str(path), "--data", "digits", "--freeze-backbone", "--out",
                 str(tmp_path / "probe"), "--no-progress"]) == 0  # fmt: skip
    assert "linear-probe: validation top-1" in capsys.readouterr().out
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    model = vitkit.from_pretrained(tmp_path / "probe" / "model.safetensors")
    assert probe["val_top1"] > 0.3  # chance is 0.1
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)  # the encoder did not
    assert torch.count_nonzero(model.head.weight) > 0
    assert probe["train_loss"] == pytest.approx(_probe_train_loss(model), rel=1e-3)  # the fitted head's, not the start
    with pytest.raises(ValueError, match="has 10 classes"):
        finetune(path, "digits", num_classes=5, out=tmp_path / "bad", progress=False, cache_dir=str(tmp_path / "cache"))
