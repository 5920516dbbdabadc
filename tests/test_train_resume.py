"""Exact resume: N steps straight == N/2 steps, stop, fresh objects resume from last.ckpt, N/2 more (CPU)."""

import torch

from vitkit.train import TrainConfig, fit
from vitkit.train.checkpoint import load_checkpoint


def tiny_run(out, **kw):
    base = dict(
        data="digits",
        val_split=0.1,
        out=str(out),
        model="vit_digits_patch2_8",
        model_kwargs=dict(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1),
        epochs=2,
        batch_size=64,
        lr=2e-3,
        warmup_epochs=0.5,
        ema_decay=0.9,
        grad_accum=2,
        progress=False,
        threads=1,
        augment=dict(
            random_crop_pad=1, hflip=True, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, random_erasing=0.25
        ),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bit_identical(tmp_path):
    straight = fit(tiny_run(tmp_path / "straight"))
    assert straight.finished and straight.steps == 2 * (1618 // 32 // 2)  # 25 optimizer steps per epoch

    half = fit(tiny_run(tmp_path / "resumed", stop_after_steps=37))  # stops mid-epoch 2, writes last.ckpt
    assert not half.finished and half.steps == 37 and half.model_path is None
    mid = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert mid["rng"]["ranks"][0]["loader"]["batch_index"] == 24  # 12 optimizer steps x 2 micro-batches into it
    resumed = fit(tiny_run(tmp_path / "resumed"))  # new model, optimizer, loader, EMA: all from the checkpoint
    assert resumed.finished and resumed.steps == straight.steps

    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(a["rng"]["ranks"][0]["torch_rng"], b["rng"]["ranks"][0]["torch_rng"])
    assert straight.val_top1 == resumed.val_top1
