"""`vitkit plot RUN`: training curves (loss, learning rate, validation accuracy, throughput) from metrics.jsonl.

A run that measures no accuracy (pretraining: a reconstruction loss) gets its validation loss in that panel.
"""

from __future__ import annotations

from pathlib import Path

from ..optional import pyplot
from .logging import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a 2x2 figure of the run's curves and save it as PNG (default `RUN/curves.png`); returns the path."""
    plt = pyplot("plotting a run's curves")
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    losses_only = not any("val_top1" in r for r in records) and any("val_loss" in r for r in records)
    metric = "val_loss" if losses_only else "val_top1"
    val = [r for r in records if r.get("kind") in ("val", "final") and r.get(metric) is not None]
    if not train and not val:
        raise ValueError(f"'{run_dir / 'metrics.jsonl'}' has no training records yet; plot after a few steps")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (axes[0, 0], train, "loss", "training loss"),
        (axes[0, 1], train, "lr", "learning rate"),
        (axes[1, 1], train, "img_per_s", "images / s"),
    ]
    for ax, rows, key, title in panels:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[1, 0]
    epochs = [r for r in val if r.get("kind") == "val"]
    if metric == "val_loss":
        _plot_val_loss(ax, val)
    elif epochs:
        ax.plot([r["step"] for r in epochs], [100 * r["val_top1"] for r in epochs], "o-", label="top-1")
        ax.plot([r["step"] for r in epochs], [100 * r["val_top5"] for r in epochs], "s--", alpha=0.6, label="top-5")
    for r in (r for r in val if r.get("kind") == "final" and metric == "val_top1"):
        ax.plot([r["step"]], [100 * r["val_top1"]], "r*", ms=12, label=f"final ({r.get('best_weights', 'raw')})")
    ax.set_title("validation accuracy (%)" if metric == "val_top1" else "validation loss")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"run: {run_dir.resolve().name}")
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_val_loss(ax, val: list[dict]) -> None:
    """The validation loss per evaluation, the final one starred."""
    epochs = [r for r in val if r.get("kind") == "val"]
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="loss")
    for r in (r for r in val if r.get("kind") == "final"):
        ax.plot([r["step"]], [r["val_loss"]], "r*", ms=12, label="final")
