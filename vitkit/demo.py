"""The demo behind `make demo`: a small ViT learns scikit-learn's handwritten digits in about a minute.

1,797 real 8×8 digit scans ship inside the scikit-learn wheel, so nothing is downloaded. The demo trains,
reports held-out accuracy, saves `model.safetensors`, predicts a few held-out digits (top-3 with softmax
probabilities), and draws each next to where the class token looked (last layer, heads averaged).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import PreprocessConfig
from .infer.attention_maps import cls_attention
from .model import create_model

DEMO_MODEL = "vit_digits_patch2_8"


def load_digits_split(seed: int = 0, val_fraction: float = 0.2):
    """Digits as float tensors in [0, 1], (N, 1, 8, 8), with a seeded stratified train/held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, va = train_test_split(np.arange(len(y)), test_size=val_fraction, random_state=seed, stratify=d.target)
    return (x[tr], y[tr]), (x[va], y[va])


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (pad by 1, random 8×8 crop), one offset per image: (B, 1, 8, 8)."""
    B = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, B), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(B, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(B, 8, 8)
    return padded[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1)


def run_demo(out: str | Path = "runs/demo", epochs: int = 60, seed: int = 0, batch_size: int = 64) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    (xtr, ytr), (xva, yva) = load_digits_split(seed)
    pre = PreprocessConfig(input_size=(8, 8), mean=(0.5,), std=(0.5,), interpolation="bilinear", crop_pct=1.0)
    norm = lambda x: (x - 0.5) / 0.5
    model = create_model(DEMO_MODEL, drop_path_rate=0.05)
    model.preprocess = pre
    model.labels = [str(i) for i in range(10)]
    steps = epochs * ((len(ytr) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    print(f"demo: {DEMO_MODEL} ({sum(p.numel() for p in model.parameters()):,} parameters) on digits: "
          f"{len(ytr)} train / {len(yva)} held-out images, {epochs} epochs")  # fmt: skip
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(norm(augment(xtr[idx], g)))
            loss = torch.nn.functional.cross_entropy(logits.float(), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    train_s = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        probs = model(norm(xva)).softmax(-1)  # (N, 10)
    acc = (probs.argmax(-1) == yva).float().mean().item()
    print(f"held-out accuracy: {acc:.2%} ({len(yva)} images), training took {train_s:.1f} s")
    ckpt = model.save(out / "model.safetensors")

    # a few held-out predictions, top-3 with probabilities
    show = list(range(6))
    for i in show:
        p, c = probs[i].topk(3)
        top = ", ".join(f"{model.labels[k]} {v:.1%}" for v, k in zip(p.tolist(), c.tolist()))
        print(f"  held-out #{i}: true {yva[i].item()} -> {top}")
    png = draw_attention(model, xva[show], norm, yva[show], probs[show], out / "attention.png")
    print(f"checkpoint: {ckpt}\nattention maps: {png}")
    return {"accuracy": acc, "train_seconds": train_s, "checkpoint": str(ckpt), "attention_png": str(png)}


def draw_attention(model, x, norm, y, probs, path: Path) -> Path:
    """Each image above its last-layer class-token attention (heads averaged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        _, maps = model(norm(x), return_attention=[-1])
    heat = cls_attention(maps[len(model.blocks) - 1], model.num_prefix_tokens, model.cfg.grid_size)  # (B, h, w)
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        axes[0, i].imshow(x[i, 0].numpy(), cmap="gray_r")
        axes[0, i].set_title(f"{y[i].item()} -> {probs[i].argmax().item()} ({probs[i].max():.0%})", fontsize=8)
        axes[1, i].imshow(heat[i].numpy(), cmap="inferno")
        for ax in axes[:, i]:
            ax.axis("off")
    axes[1, 0].set_title("cls attention", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
