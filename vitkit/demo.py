"""The demo behind `make demo`: a small ViT learns scikit-learn's handwritten digits in about a minute.

1,797 real 8×8 digit scans ship inside the scikit-learn wheel, so nothing is downloaded. The demo trains,
reports held-out accuracy, saves `model.safetensors`, predicts a few held-out digits (top-3 with softmax
probabilities), and draws each next to where the class token looked (last layer, heads averaged).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data.sources import load_source, stratified_split
from .data.transforms import AugmentConfig, build_eval_transform
from .infer.attention_maps import cls_attention
from .interop import from_pretrained
from .train import TrainConfig, fit

DEMO_MODEL = "vit_digits_patch2_8"


def demo_config(out: str | Path, epochs: int = 100, seed: int = 0, batch_size: int = 64) -> TrainConfig:
    """The demo's recipe: 1-pixel random shifts, label smoothing, AdamW with a short warmup and cosine decay."""
    return TrainConfig(
        data="digits",
        val_split=0.2,
        out=str(out),
        model=DEMO_MODEL,
        model_kwargs={"drop_path_rate": 0.05},
        epochs=epochs,
        batch_size=batch_size,
        lr=2e-3,
        min_lr=0.0,
        weight_decay=0.05,
        warmup_epochs=0.1 * epochs,
        clip_grad=None,
        seed=seed,
        augment=AugmentConfig(random_crop_pad=1, hflip=False, label_smoothing=0.1),
        checkpoint_every=0,
        eval_every=max(epochs // 6, 1),
    )


def run_demo(out: str | Path = "runs/demo", epochs: int = 100, seed: int = 0, batch_size: int = 64) -> dict:
    out = Path(out)
    (out / "last.ckpt").unlink(missing_ok=True)  # the demo always starts afresh
    (out / "metrics.jsonl").unlink(missing_ok=True)
    print(f"demo: {DEMO_MODEL} on scikit-learn's digits (1,797 8x8 scans; 20% held out), {epochs} epochs")
    res = fit(demo_config(out, epochs, seed, batch_size), resume=False)
    print(f"held-out accuracy: {res.val_top1:.2%} ({res.val_raw['n']} images), training took {res.train_seconds:.1f} s")

    # a few held-out predictions, top-3 with probabilities, from the saved file alone
    model = from_pretrained(res.model_path)
    ds = load_source("digits", progress=False)
    _, val_idx = stratified_split(ds.labels, 0.2, seed)
    show = val_idx[:6]
    raw = torch.from_numpy(ds.images[show]).permute(0, 3, 1, 2)  # (6, 1, 8, 8) uint8
    x = build_eval_transform(model.preprocess, model.cfg.in_chans)(raw)  # (6, 1, 8, 8) float32, normalised
    y = torch.from_numpy(ds.labels[show])
    with torch.no_grad():
        probs = model(x).softmax(-1)  # (6, 10)
    for i in range(len(show)):
        p, c = probs[i].topk(3)
        top = ", ".join(f"{model.labels[k]} {v:.1%}" for v, k in zip(p.tolist(), c.tolist()))
        print(f"  held-out #{i}: true {y[i].item()} -> {top}")
    png = draw_attention(model, raw, x, y, probs, out / "attention.png")
    print(f"checkpoint: {res.model_path}\nattention maps: {png}")
    return {
        "accuracy": res.val_top1,
        "train_seconds": res.train_seconds,
        "checkpoint": str(res.model_path),
        "attention_png": str(png),
    }


def draw_attention(model, images, x, y, probs, path: Path) -> Path:
    """Each image (uint8 (B, 1, H, W)) above its last-layer class-token attention (heads averaged); x: model input."""
    from .optional import pyplot

    plt = pyplot("the demo's attention figure")
    with torch.no_grad():
        _, maps = model(x, return_attention=[-1])
    heat = cls_attention(maps[len(model.blocks) - 1], model.num_prefix_tokens, model.cfg.grid_size)  # (B, h, w)
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        axes[0, i].imshow(images[i, 0].numpy(), cmap="gray_r")
        axes[0, i].set_title(f"{y[i].item()} -> {probs[i].argmax().item()} ({probs[i].max():.0%})", fontsize=8)
        axes[1, i].imshow(heat[i].numpy(), cmap="inferno")
        for ax in axes[:, i]:
            ax.axis("off")
    axes[1, 0].set_title("cls attention", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
