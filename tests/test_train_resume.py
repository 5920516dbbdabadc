"""Exact resume: N steps straight == N/2 steps, stop, fresh objects resume from last.ckpt, N/2 more (CPU)."""

import torch

from vitkit.train import fit
from vitkit.train.checkpoint import load_checkpoint

from .conftest import tiny_digits_config


def tiny_run(out, **kw):
    """Two epochs with every random part on (drop path, EMA, accumulation, each augmentation): all must resume."""
    augment = dict(
        random_crop_pad=1, hflip=True, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, random_erasing=0.25
    )
    base = dict(epochs=2, batch_size=64, warmup_epochs=0.5, ema_decay=0.9, grad_accum=2, augment=augment)
    return tiny_digits_config(out, **{**base, **kw})


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


def test_compiled_training_writes_ordinary_checkpoints_and_resumes(tmp_path):
    """`--compile` compiles the model in place: the weights file and last.ckpt carry the usual parameter names
    (no `_orig_mod.`), and a compiled run resumes from its own checkpoint."""
    from safetensors import safe_open

    from vitkit.interop import from_pretrained

    cfg = dict(epochs=1, ema_decay=0.0, grad_accum=1, model_kwargs=dict(embed_dim=16, depth=1, num_heads=2))
    half = fit(tiny_run(tmp_path / "run", compile=True, stop_after_steps=3, **cfg))
    assert half.steps == 3
    state = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert not [k for k in state["model"] if "_orig_mod" in k]
    done = fit(tiny_run(tmp_path / "run", compile=True, **cfg))
    assert done.finished and done.steps > 3 and done.val_top1 is not None
    with safe_open(str(done.model_path), "pt") as f:
        assert f.keys() and not [k for k in f.keys() if "_orig_mod" in k]
    assert from_pretrained(done.model_path).cfg.embed_dim == 16


def test_checkpoint_seconds_skips_epoch_end_writes(tmp_path, monkeypatch):
    """checkpoint_seconds: epoch ends write last.ckpt only when the last write is that old; the end always writes."""
    import importlib

    fit_module = importlib.import_module("vitkit.train.fit")  # the package exports the function `fit` too

    written = []
    real_save = fit_module.save_checkpoint
    monkeypatch.setattr(
        fit_module, "save_checkpoint", lambda path, payload: (written.append(path), real_save(path, payload))
    )
    cfg = dict(epochs=3, ema_decay=0.0, grad_accum=1, model_kwargs=dict(embed_dim=16, depth=1, num_heads=2))
    fit(tiny_run(tmp_path / "every", **cfg))
    every = len(written)
    written.clear()
    done = fit(tiny_run(tmp_path / "sparse", checkpoint_seconds=3600, **cfg))
    assert done.finished and (tmp_path / "sparse" / "last.ckpt").exists()
    assert every >= 3 and len(written) == 1  # epoch ends skipped; the final write kept
