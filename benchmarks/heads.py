"""Task heads on real pixels: each head trained from scratch and fine-tuned from a classification checkpoint at the same
CPU budget, on sets built from the CIFAR-10 archive.

    .venv/bin/python benchmarks/heads.py --task segment --minutes 10            # both heads, ~45 min on 2 cores
    ... --heads pyramid --from runs/cifar10_budget/model.safetensors           # a classifier you already have

Segmentation (`--task segment`): 64 x 64 canvases with a texture (two random colour gratings and noise), on which
one or two CIFAR-10 photos are pasted at random positions and sizes (20 to 44 px), each through an ellipse inscribed
in its square; the mask labels each pasted pixel with its photo's class (1-10) and the canvas with 0 (background):
11 classes. The archive is split once, stratified by class and seeded: 40,000 photos for the classifier, 10,000 for
the canvases (a training set of canvases and a separate validation set, each photo used once), so the classifier
never saw a pasted photo.

Runs, per head (`--heads linear,pyramid`): `vitkit train --task segment --seg-head H --minutes M` from a fresh ViT
(the default preset for 64 px: patch 4, D=192, depth 9), and `vitkit finetune --from CLS --task segment --seg-head H
--img-size 64 --minutes M` from the classification checkpoint `--from` (default: one trained here on its 40,000
photos for `--pretrain-minutes`, at 32 px, the recipe's defaults). The same data, budget, seed and augmentation
(random scale 0.5-2, crop, flip) for both. Reported: the validation set's mIoU and pixel accuracy of each run
(`vitkit evaluate --json`'s numbers), with the machine and the command; `--out FILE` appends the record to a
JSON Lines file (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from machine import DEFAULT_CIFAR10, append_record, cpu_model  # benchmarks/machine.py (this folder is on sys.path)
from PIL import Image

CANVAS = 64  # px: a 16 x 16 patch grid for the patch-4 preset
PASTED_SHARE = 0.2  # of the archive's photos, per class: pasted on canvases; the rest train the classifier
SET_VERSION = 2  # bump when the canvases change: a built set is reused only when its stamp matches


# ------------------------------------------------------------------------------------------- segmentation set


def textured_canvas(rng: np.random.Generator, size: int = CANVAS) -> np.ndarray:
    """(size, size, 3) uint8: two colour gratings of random orientation, frequency and phase, plus pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    canvas = np.zeros((size, size, 3), np.float32)
    for _ in range(2):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.03, 0.25), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        canvas += 0.5 * (low + wave[..., None] * (high - low))
    canvas += rng.normal(0, 10, canvas.shape)
    return canvas.clip(0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, mask: np.ndarray, photo: np.ndarray, label: int, rng: np.random.Generator) -> None:
    """Paste `photo` (32, 32, 3) resized to a random side through an inscribed ellipse; its pixels get `label`."""
    side = int(rng.integers(20, 45))
    top, left = (int(v) for v in rng.integers(0, CANVAS - side + 1, 2))
    resized = np.asarray(Image.fromarray(photo).resize((side, side), Image.Resampling.BILINEAR))
    yy, xx = np.mgrid[0:side, 0:side]
    r = (side - 1) / 2
    inside = ((yy - r) / (r + 0.5)) ** 2 + ((xx - r) / (r + 0.5)) ** 2 <= 1.0
    canvas[top : top + side, left : left + side][inside] = resized[inside]
    mask[top : top + side, left : left + side][inside] = label


def write_canvases(folder: Path, photos: np.ndarray, labels: np.ndarray, classes: list[str], seed: int) -> int:
    """folder/images/*.png, folder/masks/*.png, folder/classes.txt; one or two photos per canvas, each photo once."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    order = rng.permutation(len(photos))
    i = n = 0
    while i < len(order):
        canvas, mask = textured_canvas(rng), np.zeros((CANVAS, CANVAS), np.uint8)
        for j in order[i : i + int(rng.integers(1, 3))]:
            paste(canvas, mask, photos[j], int(labels[j]) + 1, rng)
            i += 1
        Image.fromarray(canvas).save(folder / "images" / f"{n:05d}.png")
        Image.fromarray(mask, mode="L").save(folder / "masks" / f"{n:05d}.png")
        n += 1
    (folder / "classes.txt").write_text("\n".join(["background", *classes]) + "\n")
    return n


def archive_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the classifier's photos, the photos to paste): a stratified, seeded split of the archive, each part in a
    seeded random order (the archive is stored class by class, so a prefix of it would hold a few classes only)."""
    from vitkit.data.sources import stratified_split

    rng = np.random.default_rng(seed)
    classifier, pasted = stratified_split(labels, PASTED_SHARE, seed)
    return rng.permutation(classifier), rng.permutation(pasted)


def build_segmentation_sets(
    archive: str, work: Path, photos_used: int, val_photos: int, seed: int
) -> tuple[Path, Path, int, int]:
    """(train folder, validation folder, canvases in each) from `photos_used` of the photos `archive_split` sets
    aside for pasting, `val_photos` of them on the validation canvases; reused when built before alike."""
    from vitkit.data.sources import load_source

    stamp = {"version": SET_VERSION, "archive": str(Path(archive).resolve()), "photos": photos_used, "seed": seed}
    stamp["val_photos"] = val_photos
    root = work / "segment-set"
    done = root / "stamp.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == stamp:
        counts = json.loads(done.read_text())["canvases"]
        return root / "train", root / "val", counts[0], counts[1]
    ds = load_source(archive, progress=False)
    chosen = np.sort(archive_split(ds.labels, seed)[1][:photos_used])
    photos, labels = np.asarray(ds.images[chosen]), np.asarray(ds.labels[chosen])
    n_train = len(photos) - val_photos
    train = write_canvases(root / "train", photos[:n_train], labels[:n_train], ds.classes, seed)
    val = write_canvases(root / "val", photos[n_train:], labels[n_train:], ds.classes, seed + 1)
    done.write_text(json.dumps({"settings": stamp, "canvases": [train, val]}))
    return root / "train", root / "val", train, val


# ------------------------------------------------------------------------------------------------ classifier


def write_classifier_folder(archive: str, folder: Path, limit: int, seed: int) -> Path:
    """`limit` of the classifier's photos (`archive_split`) as an image folder (folder/<class>/<i>.png), for
    `vitkit train`."""
    from vitkit.data.sources import load_source

    if (folder / "done").is_file():
        return folder
    ds = load_source(archive, progress=False)
    for c in ds.classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i in np.sort(archive_split(ds.labels, seed)[0][:limit]):
        Image.fromarray(np.asarray(ds.images[i])).save(folder / ds.classes[int(ds.labels[i])] / f"{i:05d}.png")
    (folder / "done").write_text("")
    return folder


def pretrain_classifier(archive: str, work: Path, minutes: float, photos: int, seed: int, quiet: bool) -> Path:
    """A CIFAR-10 classifier trained on `photos` of its share of the archive for `minutes`, with `vitkit train`'s
    defaults."""
    from vitkit.train import build_config, fit

    folder = write_classifier_folder(archive, work / f"classifier-photos-{photos}-seed{seed}", photos, seed)
    cfg = build_config(data=str(folder), out=str(work / "classifier"), minutes=minutes, seed=seed, progress=not quiet)
    res = fit(cfg)
    print(f"classifier: val top-1 {res.val_top1:.2%} after {res.steps} steps ({minutes:g} min) -> {res.model_path}")
    return Path(res.model_path)


# ----------------------------------------------------------------------------------------------------- runs


def judge(model_path: Path, val: Path) -> dict:
    """mIoU and pixel accuracy of a saved segmentation model on the validation canvases (`vitkit evaluate`'s)."""
    from vitkit.infer.evaluate import evaluate_model
    from vitkit.model.loading import load_model
    from vitkit.tasks import task_of

    model = load_model(model_path)
    task = task_of(model)
    ds = task.read(str(val), progress=False, classes=model.labels)
    res = evaluate_model(model, ds, task=task).result
    return {"miou": round(res["miou"], 4), "pixel_acc": round(res["pixel_acc"], 4)}


def run_segment(args: argparse.Namespace, work: Path, classifier: Path) -> list[dict]:
    """Each head from scratch and fine-tuned from `classifier` at the same budget; their validation numbers."""
    from vitkit.train import build_config, fit
    from vitkit.train.finetune import finetune

    train, val, n_train, n_val = build_segmentation_sets(args.data, work, args.photos, args.val_photos, args.seed)
    print(f"segmentation set: {n_train} training / {n_val} validation canvases of {CANVAS} px, 11 classes ({train})")
    common = dict(task="segment", val_data=str(val), minutes=args.minutes, seed=args.seed, progress=not args.quiet)
    rows = []
    for head in args.heads:
        t = time.perf_counter()
        cfg = build_config(data=str(train), out=str(work / f"segment-{head}-scratch"), seg_head=head, **common)
        scratch = judge(Path(fit(cfg).model_path), val)
        scratch_s = time.perf_counter() - t
        t = time.perf_counter()
        res = finetune(
            str(classifier),
            str(train),
            out=work / f"segment-{head}-finetuned",
            img_size=CANVAS,
            seg_head=head,
            **common,
        )
        tuned = judge(Path(res.model_path), val)
        rows.append(
            {
                "head": head,
                "scratch": scratch,
                "finetuned": tuned,
                "gain_miou": round(tuned["miou"] - scratch["miou"], 4),
                "seconds": {"scratch": round(scratch_s, 1), "finetuned": round(time.perf_counter() - t, 1)},
            }
        )
        print(f"  {head}: from scratch mIoU {scratch['miou']:.4f}, fine-tuned {tuned['miou']:.4f}")
    return rows


def machine() -> str:
    import torch

    import vitkit

    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads; Python "
        f"{platform.python_version()}, torch {torch.__version__}, vitkit {vitkit.__version__}"
    )


def print_table(rows: list[dict], minutes: float) -> None:
    print(f"\n{minutes:g} min of training each:")
    print("| head | from scratch mIoU | fine-tuned mIoU | gain | pixel acc. scratch / fine-tuned |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        s, f = r["scratch"], r["finetuned"]
        print(
            f"| {r['head']} | {s['miou']:.4f} | {f['miou']:.4f} | {r['gain_miou']:+.4f} | "
            f"{s['pixel_acc']:.4f} / {f['pixel_acc']:.4f} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("segment",), default="segment", help="which task's heads to measure")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of every run (scratch and fine-tune)")
    p.add_argument("--heads", default="linear,pyramid", help="segmentation heads, comma-separated")
    p.add_argument("--from", dest="source", help="a classification checkpoint to fine-tune (default: train one)")
    p.add_argument("--pretrain-minutes", type=float, default=10.0, help="the classifier's budget when trained here")
    p.add_argument(
        "--classifier-photos", type=int, default=40_000, help="photos the classifier trains on (at most its 40,000)"
    )
    p.add_argument("--data", default=DEFAULT_CIFAR10, help=f"CIFAR-10 train archive (default {DEFAULT_CIFAR10})")
    p.add_argument(
        "--photos", type=int, default=10_000, help="photos pasted on canvases (at most the 10,000 set aside)"
    )
    p.add_argument("--val-photos", type=int, default=1500, help="of those, the photos on the validation canvases")
    p.add_argument("--work", default="runs/bench-heads", help="where the sets, the runs and the models go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", help="append the record to this JSON Lines file (e.g. benchmarks/results/heads.jsonl)")
    args = p.parse_args()
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    classifier = Path(args.source) if args.source else pretrain_classifier(
        args.data, work, args.pretrain_minutes, args.classifier_photos, args.seed, args.quiet
    )  # fmt: skip
    rows = run_segment(args, work, classifier)
    print_table(rows, args.minutes)
    figures = {
        "task": args.task,
        "minutes": args.minutes,
        "classifier": str(classifier),
        "pretrain_minutes": None if args.source else args.pretrain_minutes,
        "machine": machine(),
        "rows": rows,
    }
    print(json.dumps(figures))
    if args.out:
        append_record(args.out, "heads", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
