"""Retrieval recall@k on CIFAR-10, and the pointing game of each explain method on objects pasted onto canvases.

    .venv/bin/python benchmarks/retrieval_pointing.py --checkpoint runs/cifar/model.safetensors
    .venv/bin/python benchmarks/retrieval_pointing.py --train-minutes 10 --pointing-seconds 600   # trains both
    ... --only retrieval | --only pointing

(a) Retrieval: the checkpoint's pooled features (`vitkit.infer.retrieval.evaluate_retrieval`, exact cosine search)
of the stratified 10 % of the CIFAR-10 train archive that `vitkit train` holds out (seed 0) are the queries; the
other 90 % the gallery. Reported: recall@1 and recall@5 (a query counts when an image of its class is among its k
nearest). Without --checkpoint, one is trained first: `vitkit train --recipe cifar10_budget --minutes M`.

(b) Pointing game (Zhang et al. 2016): each CIFAR-10 image is pasted at a random place on a larger canvas of
random gratings and noise, so where the object lies is known. A ViT is trained on such canvases (fresh ones every
step) for a wall-clock budget; then, on canvases built from the held-out images, each explain method's map is
upsampled to the canvas and its maximum checked: a hit when it falls inside the pasted image. Methods: attention
(last layer, class token), rollout, grad-rollout for the true class. Baselines: the fraction of the canvas the
object covers (a random point's hit rate) and the canvas centre.

Prints the machine, versions and command; the last line is one JSON object (`--out FILE` also appends it to a
JSON Lines file, as benchmarks/machine.py's `append_record` does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from machine import DEFAULT_CIFAR10, append_record, cpu_model  # benchmarks/machine.py (this folder is on sys.path)

import vitkit  # noqa: E402
from vitkit.config import PreprocessConfig  # noqa: E402
from vitkit.data.sources import ImageArrayDataset, load_source  # noqa: E402
from vitkit.infer.explain import Explainer  # noqa: E402
from vitkit.infer.frozen import split_bank_queries  # noqa: E402
from vitkit.infer.predict import Predictor  # noqa: E402
from vitkit.infer.retrieval import evaluate_retrieval  # noqa: E402
from vitkit.optional import available  # noqa: E402
from vitkit.train.loop import EpochHooks, StepState, train_one_epoch  # noqa: E402
from vitkit.train.optim import build_optimizer  # noqa: E402
from vitkit.train.schedule import WarmupCosine  # noqa: E402

QUERY_FRACTION = 0.1  # the cifar10_budget recipe's --val-split: the queries are the images its training held out
METHODS = ("attention", "rollout", "grad-rollout")


def machine() -> str:
    faiss = "faiss installed" if available("faiss") else "no faiss"
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads; Python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, vitkit {vitkit.__version__}"
        f", {faiss}"
    )


def subsample(idx: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` of the indices, drawn without replacement (quick runs); all of them when limit is None."""
    if limit is None or limit >= len(idx):
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))


# ---------------------------------------------------------------------------------------------------- retrieval
def train_checkpoint(data: str, minutes: float, out: Path) -> Path:
    """`vitkit train --recipe cifar10_budget --minutes M` in a subprocess; returns the run's model file."""
    cmd = [sys.executable, "-m", "vitkit", "train", "--recipe", "cifar10_budget", "--minutes", str(minutes)]
    cmd += ["--data", data, "--out", str(out), "--no-progress"]
    print("training the checkpoint:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "model.safetensors"


def retrieval(args: argparse.Namespace, ds: ImageArrayDataset) -> dict:
    ckpt = Path(args.checkpoint) if args.checkpoint else train_checkpoint(args.data, args.train_minutes, args.out_dir)
    model = vitkit.from_pretrained(ckpt)
    gallery_idx, query_idx = split_bank_queries(ds.labels, QUERY_FRACTION, args.seed)
    gallery_idx = subsample(gallery_idx, args.gallery_limit, args.seed)
    query_idx = subsample(query_idx, args.query_limit, args.seed + 1)
    t = time.perf_counter()
    report = evaluate_retrieval(model, ds, ds, query_idx, gallery_idx, batch_size=256, precision=args.precision)
    seconds = time.perf_counter() - t
    print(
        f"retrieval: {ckpt}: {report.queries} queries against {report.gallery} gallery images: recall@1 "
        f"{report.recall[1]:.2%}, recall@5 {report.recall[5]:.2%} ({seconds:.0f} s to embed and search, "
        f"{args.precision})"
    )
    return {
        "checkpoint": str(ckpt),
        "recall@1": round(report.recall[1], 4),
        "recall@5": round(report.recall[5], 4),
        "queries": report.queries,
        "gallery": report.gallery,
        "seconds": round(seconds, 1),
    }


# -------------------------------------------------------------------------------------------------- canvases
def textures(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n random backgrounds (n, size, size, 3) uint8: three coloured sinusoidal gratings each, plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((n, size, size, 3), np.float32)
    for _ in range(3):
        freq = rng.uniform(2, 12, (n, 1, 1))  # cycles across the canvas
        angle = rng.uniform(0, np.pi, (n, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)  # (n, size, size)
        out += wave[..., None] * rng.uniform(-50, 50, (n, 1, 1, 3))
    out += rng.uniform(60, 190, (n, 1, 1, 3)) + rng.normal(0, 12, out.shape)
    return out.clip(0, 255).astype(np.uint8)


def paste(objects: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Objects (n, h, w, 3) pasted at random places on textures: canvases (n, size, size, 3), boxes (n, 4) as
    (top, left, bottom, right), bottom and right exclusive."""
    n, h, w = objects.shape[:3]
    canvases = textures(n, size, rng)
    tops, lefts = rng.integers(0, size - h + 1, n), rng.integers(0, size - w + 1, n)
    for i in range(n):
        canvases[i, tops[i] : tops[i] + h, lefts[i] : lefts[i] + w] = objects[i]
    return canvases, np.stack([tops, lefts, tops + h, lefts + w], axis=1)


def to_input(canvases: np.ndarray, pre: PreprocessConfig) -> torch.Tensor:
    """uint8 canvases (n, H, W, 3) -> normalised model input (n, 3, H, W); the canvas is the whole input (no crop)."""
    x = torch.from_numpy(canvases).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    return (x - mean) / std


def canvas_batches(ds: ImageArrayDataset, idx: np.ndarray, batch: int, size: int, pre: PreprocessConfig, seed: int):
    """Endless training batches: random images of `idx` on fresh canvases, each flipped half the time."""
    rng = np.random.default_rng(seed)
    while True:
        pick = np.sort(rng.choice(idx, batch, replace=False))
        objects = np.asarray(ds.images[pick])
        flip = rng.random(batch) < 0.5
        objects[flip] = objects[flip, :, ::-1]
        canvases, _ = paste(objects, size, rng)
        yield to_input(canvases, pre), torch.from_numpy(np.asarray(ds.labels)[pick]).long()


# ------------------------------------------------------------------------------------------------ pointing game
def pointing_model(args: argparse.Namespace, classes: list[str]) -> vitkit.VisionTransformer:
    """A ViT-Ti-shaped classifier for the canvases: patch 8, a class token (the maps read its row)."""
    torch.manual_seed(args.seed)
    model = vitkit.create_model(
        "vit_tiny_patch16_224",
        img_size=args.canvas,
        patch_size=8,
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=max(args.dim // 64, 1),
        num_classes=len(classes),
    )
    model.preprocess = PreprocessConfig(input_size=(args.canvas, args.canvas), crop_pct=1.0)
    model.labels = list(classes)
    return model


def train_on_canvases(model, ds: ImageArrayDataset, idx: np.ndarray, args: argparse.Namespace) -> dict:
    """Train for `args.pointing_seconds` of wall time; the cosine is laid over the steps measured to fit."""
    optimizer = build_optimizer(model, args.lr, weight_decay=0.05)
    schedule = WarmupCosine(args.lr, total_steps=10**9, warmup_fraction=0.05, min_lr=args.lr * 0.01)
    state, t0 = StepState(), time.perf_counter()

    def after_step(step: int) -> None:
        if step == 10:  # calibrate once: how many steps fit in the budget at this pace
            pace = (time.perf_counter() - t0) / step
            schedule.relayout(max(int(args.pointing_seconds / pace), step + 1))

    hooks = EpochHooks(
        should_stop=lambda step: time.perf_counter() - t0 >= args.pointing_seconds, after_step=after_step
    )
    batches = canvas_batches(ds, idx, args.batch_size, args.canvas, model.preprocess, args.seed)
    train_one_epoch(
        model, batches, optimizer, schedule, state, device=torch.device("cpu"), precision="bf16",
        label_smoothing=0.1, clip_grad=1.0, hooks=hooks,
    )  # fmt: skip
    model.eval()
    return {"steps": state.step, "images": state.images_seen, "seconds": round(time.perf_counter() - t0, 1)}


def hits(heat: torch.Tensor, boxes: np.ndarray, size: int) -> np.ndarray:
    """Whether each map's maximum, upsampled bilinearly to the canvas (as the overlays draw it), lies in its box."""
    up = F.interpolate(heat[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1).argmax(dim=1).numpy()
    y, x = flat // size, flat % size
    return (boxes[:, 0] <= y) & (y < boxes[:, 2]) & (boxes[:, 1] <= x) & (x < boxes[:, 3])


def pointing(args: argparse.Namespace, ds: ImageArrayDataset) -> dict:
    train_idx, test_idx = split_bank_queries(ds.labels, QUERY_FRACTION, args.seed)
    train_idx = subsample(train_idx, args.gallery_limit, args.seed)
    test_idx = subsample(test_idx, args.pointing_images, args.seed + 2)
    model = pointing_model(args, ds.classes)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"pointing: {args.canvas}x{args.canvas} canvases, 32x32 objects, ViT patch 8 D={args.dim} depth {args.depth} "
        f"({n_params:,} parameters), training {args.pointing_seconds:.0f} s ...",
        flush=True,
    )
    run = train_on_canvases(model, ds, train_idx, args)
    canvases, boxes = paste(np.asarray(ds.images[test_idx]), args.canvas, np.random.default_rng(args.seed + 3))
    x, y = to_input(canvases, model.preprocess), torch.from_numpy(np.asarray(ds.labels)[test_idx]).long()
    predictor = Predictor(model)
    found: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    correct = 0
    for start in range(0, len(x), 64):
        xb, yb, bb = x[start : start + 64], y[start : start + 64], boxes[start : start + 64]
        for method in METHODS:
            if method == "grad-rollout":  # the true class: the map answers "where is the object of this class?"
                heat = Explainer(predictor, method).maps(xb, targets=yb)[1]
            else:
                logits, heat = Explainer(predictor, method).maps(xb)
                correct += int((logits.argmax(dim=1) == yb).sum()) if method == "attention" else 0
            found[method].append(hits(heat, bb, args.canvas))
    area = float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))) / args.canvas**2
    centre = args.canvas // 2
    at_centre = (boxes[:, 0] <= centre) & (centre < boxes[:, 2]) & (boxes[:, 1] <= centre) & (centre < boxes[:, 3])
    result = {m: round(float(np.concatenate(v).mean()), 4) for m, v in found.items()}
    accuracy = correct / len(x)
    print(f"pointing: classifier top-1 on {len(x)} held-out canvases {accuracy:.2%} ({run['steps']} steps)")
    for m in METHODS:
        print(f"  {m:<13} {result[m]:.2%} of maps peak on the object")
    print(f"  baselines: random point {area:.2%}, canvas centre {at_centre.mean():.2%}")
    return {
        "pointing": result,
        "random_baseline": round(area, 4),
        "centre_baseline": round(float(at_centre.mean()), 4),
        "classifier_top1": round(accuracy, 4),
        "test_canvases": len(x),
        "canvas": args.canvas,
        "params": n_params,
        **{f"train_{k}": v for k, v in run.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_CIFAR10, help=f"CIFAR-10 train archive (default {DEFAULT_CIFAR10})")
    p.add_argument("--only", choices=("retrieval", "pointing"), help="run one part only")
    p.add_argument("--checkpoint", help="retrieval: the checkpoint to judge (default: train one with the recipe)")
    p.add_argument("--train-minutes", type=float, default=10.0, help="retrieval: the recipe's budget if training")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="retrieval: embedding arithmetic")
    p.add_argument("--pointing-seconds", type=float, default=600.0, help="pointing: training budget (wall time)")
    p.add_argument("--pointing-images", type=int, default=1000, help="pointing: held-out canvases judged")
    p.add_argument(
        "--canvas",
        type=int,
        default=96,
        help="pointing: canvas side in pixels, a multiple of 8 (default 96: the object covers 1/9 of it; at 64 the "
        "canvas centre would lie on almost every object)",
    )
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gallery-limit", type=int, help="use at most this many gallery / training images (quick runs)")
    p.add_argument("--query-limit", type=int, help="use at most this many retrieval queries (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("runs/retrieval_pointing"), help="where a trained run goes")
    p.add_argument("--out", help="append the result to this JSON Lines file (e.g. benchmarks/results/...jsonl)")
    args = p.parse_args()
    if args.canvas % 8 or args.canvas < 64:
        p.error(f"--canvas must be a multiple of 8 and at least 64 (twice a CIFAR-10 image), got {args.canvas}")
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    t = time.perf_counter()
    ds = load_source(args.data, progress=False)
    print(f"data: {ds.source}: {len(ds)} images ({time.perf_counter() - t:.1f} s to load)")
    figures: dict = {}
    if args.only in (None, "retrieval"):
        figures["retrieval"] = retrieval(args, ds)
    if args.only in (None, "pointing"):
        figures["pointing"] = pointing(args, ds)
    if args.out:
        append_record(args.out, "retrieval_pointing", {"machine": machine(), **figures})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
