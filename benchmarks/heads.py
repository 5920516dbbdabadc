"""Task heads on real pixels: each head trained from scratch and fine-tuned from a classification checkpoint at the same
CPU budget, on sets built from the CIFAR-10 archive.

    .venv/bin/python benchmarks/heads.py --task all --minutes 10 --out benchmarks/results/heads.jsonl
    .venv/bin/python benchmarks/heads.py --task multilabel --quick     # every step with tiny sizes, ~1 min on 2 cores
    ... --heads pyramid --from runs/cifar10_budget/model.safetensors   # a classifier you already have

The archive is split once, stratified by class and seeded: 40,000 photos for the classifier and 10,000 set aside for
the task sets (each set's training and validation images from separate photos), so the classifier never saw a photo
of a task set. The classifier (`--from`, or by default one trained here on its photos for `--pretrain-minutes` at
32 px with `vitkit train`'s defaults) is trained once and reused: by every task of `--task all`, and by a later run
with the same settings (its file and settings are kept in WORK/classifier).

Segmentation (`--task segment`): 64 x 64 canvases with a texture (two random colour gratings and noise), on which
one or two photos are pasted at random positions and sizes (20 to 44 px), each through an ellipse inscribed in its
square; the mask labels each pasted pixel with its photo's class (1-10) and the canvas with 0 (background): 11
classes. Runs per head (`--heads linear,pyramid`). Reported: mIoU and pixel accuracy.

Multi-label (`--task multilabel`): 64 x 64 mosaics, a 2 x 2 grid of 32-px cells holding one to four photos in random
cells (the other cells textured like the canvases); an image's labels are the set of its photos' classes, written as
a folder of images plus `labels.csv` (`path,labels`), as `vitkit train --task multilabel --data FOLDER` reads it.
Reported: mAP, micro F1 and macro F1 at the 0.5 threshold.

Runs: `vitkit train --task T --minutes M` from a fresh ViT (the default preset for 64 px: patch 4, D=192, depth 9)
and `vitkit finetune --from CLS --task T --img-size 64 --minutes M` from the classifier: the same data, budget, seed
and augmentation for both, each in a fresh run folder. Each is judged on its validation set with `vitkit evaluate
--json`'s numbers, and the record carries every run's wall seconds (the training verb, data loading included, and the
evaluation). `--out FILE` appends one record per task to a JSON Lines file (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import DEFAULT_CIFAR10, append_record, cpu_model  # benchmarks/machine.py (this folder is on sys.path)
from PIL import Image

CANVAS = 64  # px: a 16 x 16 patch grid for the patch-4 preset
PASTED_SHARE = 0.2  # of the archive's photos, per class: set aside for the task sets; the rest train the classifier
SET_VERSION = 3  # bump when the canvases change: a built set is reused only when its stamp matches
MOSAIC_GRID = 2  # cells a side: 2 x 2 cells of 32-px photos make a 64-px mosaic
MOSAIC_VERSION = 1  # bump when the mosaics change
TASKS = ("segment", "multilabel")
METRICS = {"segment": ("miou", "pixel_acc"), "multilabel": ("map", "f1", "f1_macro")}  # evaluate --json's keys
HEADLINE = {"segment": "miou", "multilabel": "map"}

# Sizes of a full run, and of `--quick` (every step end to end in about a minute on 2 cores: the numbers mean
# nothing, the run shows that the sets, the classifier, both arms and the record work). A flag given wins.
FULL = {"minutes": 10.0, "pretrain_minutes": 10.0, "classifier_photos": 40_000, "photos": 10_000, "val_photos": 1500}
QUICK = {"minutes": 0.1, "pretrain_minutes": 0.1, "classifier_photos": 300, "photos": 200, "val_photos": 80}


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


# --------------------------------------------------------------------------------------------- multi-label set


def mosaic(photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """(CANVAS, CANVAS, 3) uint8: a textured canvas with each photo in its own random cell of the grid."""
    cell = CANVAS // MOSAIC_GRID
    if len(photos) > MOSAIC_GRID**2 or any(p.shape != (cell, cell, 3) for p in photos):
        raise ValueError(f"a mosaic holds at most {MOSAIC_GRID**2} RGB photos of {cell} x {cell} px")
    image = textured_canvas(rng)
    for photo, c in zip(photos, rng.choice(MOSAIC_GRID**2, size=len(photos), replace=False)):
        top, left = (cell * int(v) for v in divmod(int(c), MOSAIC_GRID))
        image[top : top + cell, left : left + cell] = photo
    return image


def write_mosaics(folder: Path, photos: np.ndarray, labels: np.ndarray, classes: list[str], seed: int) -> int:
    """folder/images/*.png and folder/labels.csv (`path,labels`: the classes of the photos shown, `;`-separated);
    one to four photos per mosaic, each photo once."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(photos))
    rows: list[tuple[str, str]] = []
    i = 0
    while i < len(order):
        chosen = order[i : i + int(rng.integers(1, MOSAIC_GRID**2 + 1))]
        name = f"images/{len(rows):05d}.png"
        Image.fromarray(mosaic([photos[j] for j in chosen], rng)).save(folder / name)
        rows.append((name, ";".join(sorted({classes[int(labels[j])] for j in chosen}))))
        i += len(chosen)
    with (folder / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "labels"), *rows])
    return len(rows)


# --------------------------------------------------------------------------------------------------- the sets

WRITERS: dict[str, tuple[Callable[..., int], int]] = {
    "segment": (write_canvases, SET_VERSION),
    "multilabel": (write_mosaics, MOSAIC_VERSION),
}


def archive_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the classifier's photos, the photos of the task sets): a stratified, seeded split of the archive, each part
    in a seeded random order (the archive is stored class by class, so a prefix of it would hold a few classes)."""
    from vitkit.data.sources import stratified_split

    rng = np.random.default_rng(seed)
    classifier, pasted = stratified_split(labels, PASTED_SHARE, seed)
    return rng.permutation(classifier), rng.permutation(pasted)


def task_photo_split(labels: np.ndarray, photos_used: int, val_photos: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) archive indices of a task set: `photos_used` of the photos `archive_split` sets aside,
    taken in its random order (not the archive's, which is class by class: a validation part cut from its end
    would hold the last classes only), `val_photos` of them for validation."""
    chosen = archive_split(labels, seed)[1][:photos_used]
    return chosen[: len(chosen) - val_photos], chosen[len(chosen) - val_photos :]


def build_sets(
    task: str, archive: str, work: Path, photos_used: int, val_photos: int, seed: int
) -> tuple[Path, Path, int, int]:
    """(train folder, validation folder, images in each) of `task` from `photos_used` of the photos `archive_split`
    sets aside, `val_photos` of them in the validation images; reused when built before alike."""
    from vitkit.data.sources import load_source

    write, version = WRITERS[task]
    stamp = {"version": version, "archive": str(Path(archive).resolve()), "photos": photos_used, "seed": seed}
    stamp["val_photos"] = val_photos
    root = work / f"{task}-set"
    done = root / "stamp.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == stamp:
        counts = json.loads(done.read_text())["images"]
        return root / "train", root / "val", counts[0], counts[1]
    shutil.rmtree(root, ignore_errors=True)  # another set's files would mix with the new one's
    ds = load_source(archive, progress=False)
    split = task_photo_split(ds.labels, photos_used, val_photos, seed)
    train_idx, val_idx = (np.sort(i) for i in split)  # read in archive order; the writers shuffle the photos
    train = write(root / "train", np.asarray(ds.images[train_idx]), ds.labels[train_idx], ds.classes, seed)
    val = write(root / "val", np.asarray(ds.images[val_idx]), ds.labels[val_idx], ds.classes, seed + 1)
    done.write_text(json.dumps({"settings": stamp, "images": [train, val]}))
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


def reusable_classifier(folder: Path, settings: dict) -> dict | None:
    """The record of a classifier trained in `folder` with these settings, when its model file is still there."""
    stamp = folder / "benchmark.json"
    if not stamp.is_file():
        return None
    record = json.loads(stamp.read_text())
    return record if record.get("settings") == settings and Path(record["path"]).is_file() else None


def pretrain_classifier(
    archive: str, work: Path, minutes: float, photos: int, seed: int, quiet: bool, recipe: str | None = None
) -> dict:
    """{"path", "seconds", "val_top1", "origin" (trained or reused)}: a CIFAR-10 classifier trained on `photos` of
    its share of the archive for `minutes` with `recipe` (None: `vitkit train`'s defaults), or the one a run with
    the same settings left in WORK/classifier."""
    from vitkit.train import build_config, fit

    out = work / "classifier"
    settings = {"archive": str(Path(archive).resolve()), "minutes": minutes, "photos": photos, "seed": seed}
    if recipe:
        settings["recipe"] = recipe
    kept = reusable_classifier(out, settings)
    if kept is not None:
        print(f"classifier: reusing {kept['path']} (val top-1 {kept['val_top1']:.2%}, trained in {kept['seconds']} s)")
        return {**{k: kept[k] for k in ("path", "seconds", "val_top1")}, "origin": "reused"}
    t = time.perf_counter()
    folder = write_classifier_folder(archive, work / f"classifier-photos-{photos}-seed{seed}", photos, seed)
    cfg = build_config(recipe, data=str(folder), out=str(fresh(out)), minutes=minutes, seed=seed, progress=not quiet)
    res = fit(cfg)
    record = {"path": str(res.model_path), "seconds": round(time.perf_counter() - t, 1), "val_top1": res.val_top1}
    (out / "benchmark.json").write_text(json.dumps({"settings": settings, **record}))
    print(f"classifier: val top-1 {res.val_top1:.2%} after {res.steps} steps ({minutes:g} min) -> {res.model_path}")
    return {**record, "origin": "trained"}


# ----------------------------------------------------------------------------------------------------- runs


def fresh(folder: Path) -> Path:
    """`folder`, emptied: a run folder of an earlier benchmark would be resumed (its budget already spent)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def judge(model_path: Path, val: Path, keys: tuple[str, ...]) -> dict:
    """The validation numbers `keys` of a saved model (`vitkit evaluate --json`'s), read as its task reads data."""
    from vitkit.infer.evaluate import evaluate_model
    from vitkit.model.loading import load_model
    from vitkit.tasks import task_of

    model = load_model(model_path)
    task = task_of(model)
    ds = task.read(str(val), progress=False, classes=model.labels)
    res = evaluate_model(model, ds, task=task).result
    return {k: round(res[k], 4) for k in keys}


def judged_run(train: Callable[[], Path], val: Path, keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(the validation numbers, {"train": s, "evaluate": s}) of one run; `train` trains and returns the model file."""
    t = time.perf_counter()
    model_path = train()
    trained = time.perf_counter()
    numbers = judge(model_path, val, keys)
    return numbers, {"train": round(trained - t, 1), "evaluate": round(time.perf_counter() - trained, 1)}


def scratch_model(recipe: str | None) -> dict:
    """The architecture of `recipe`'s model ({} without one: the default preset), for the from-scratch runs: the
    same network the fine-tuned runs start from, only the weights differ. The recipe's other settings (its
    augmentation and schedule, made for 32-px classification) stay out of the task runs."""
    if not recipe:
        return {}
    from vitkit.train.recipe import load_recipe

    d = load_recipe(recipe)
    return {"model": d.get("model"), "model_kwargs": d.get("model_kwargs") or {}}


def scratch_and_finetuned(
    args: argparse.Namespace, task: str, train: Path, val: Path, classifier: str, name: str, **options: object
) -> dict:
    """One row: `task` trained from scratch and fine-tuned from `classifier` at the same budget, both judged on
    `val`, with each run's wall seconds (training verb, evaluation)."""
    from vitkit.train import build_config, fit
    from vitkit.train.finetune import finetune

    common = dict(task=task, val_data=str(val), minutes=args.minutes, seed=args.seed, progress=not args.quiet)
    work, keys = Path(args.work), METRICS[task]

    def from_scratch() -> Path:
        out = fresh(work / f"{task}-{name}-scratch")
        return Path(
            fit(
                build_config(
                    data=str(train), out=str(out), **scratch_model(args.recipe), image_size=CANVAS, **common, **options
                )
            ).model_path
        )

    def fine_tuned() -> Path:
        out = fresh(work / f"{task}-{name}-finetuned")
        tuning = {"lr": args.finetune_lr, "layer_decay": args.layer_decay}
        tuning = {k: v for k, v in tuning.items() if v is not None}  # unset: finetune's own defaults
        return Path(
            finetune(classifier, str(train), out=out, img_size=CANVAS, **common, **tuning, **options).model_path
        )

    scratch, scratch_s = judged_run(from_scratch, val, keys)
    tuned, tuned_s = judged_run(fine_tuned, val, keys)
    key = HEADLINE[task]
    print(f"  {name}: from scratch {key} {scratch[key]:.4f}, fine-tuned {tuned[key]:.4f}")
    return {
        "head": name,
        "scratch": scratch,
        "finetuned": tuned,
        f"gain_{key}": round(tuned[key] - scratch[key], 4),
        "seconds": {"scratch": scratch_s, "finetuned": tuned_s},
    }


def run_task(args: argparse.Namespace, task: str, classifier: str) -> tuple[dict, list[dict]]:
    """(the set's sizes and build seconds, one row per head) of `task`."""
    t = time.perf_counter()
    train, val, n_train, n_val = build_sets(task, args.data, Path(args.work), args.photos, args.val_photos, args.seed)
    built = {"train_images": n_train, "val_images": n_val, "seconds": round(time.perf_counter() - t, 1)}
    what = "canvases, 11 classes" if task == "segment" else "mosaics, 10 labels"
    print(f"{task} set: {n_train} training / {n_val} validation {what} of {CANVAS} px ({train})")
    if task == "segment":
        rows = [scratch_and_finetuned(args, task, train, val, classifier, h, seg_head=h) for h in args.heads]
    else:
        rows = [scratch_and_finetuned(args, task, train, val, classifier, "linear")]
    return built, rows


def machine() -> str:
    import torch

    import vitkit

    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads; Python "
        f"{platform.python_version()}, torch {torch.__version__}, vitkit {vitkit.__version__}"
    )


def print_table(task: str, rows: list[dict], minutes: float) -> None:
    print(f"\n{task}, {minutes:g} min of training each:")
    if task == "segment":
        print("| head | from scratch mIoU | fine-tuned mIoU | gain | pixel acc. scratch / fine-tuned |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            s, f = r["scratch"], r["finetuned"]
            print(
                f"| {r['head']} | {s['miou']:.4f} | {f['miou']:.4f} | {r['gain_miou']:+.4f} | "
                f"{s['pixel_acc']:.4f} / {f['pixel_acc']:.4f} |"
            )
        return
    print("| head | from scratch mAP | fine-tuned mAP | gain | F1 (micro) scratch / fine-tuned |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        s, f = r["scratch"], r["finetuned"]
        gain = r["gain_map"]
        print(f"| {r['head']} | {s['map']:.4f} | {f['map']:.4f} | {gain:+.4f} | {s['f1']:.4f} / {f['f1']:.4f} |")


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the sizes of `--quick` or of a full run where no flag gives them; bad sizes exit with
    a message saying which."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=(*TASKS, "all"), default="segment", help="which task's heads to measure")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds of budget: checks every step, ~1 min")
    p.add_argument("--minutes", type=float, help="training budget of every run, scratch and fine-tune (default 10)")
    p.add_argument("--heads", default="linear,pyramid", help="segmentation heads, comma-separated")
    p.add_argument("--from", dest="source", help="a classification checkpoint to fine-tune (default: train one)")
    p.add_argument(
        "--recipe",
        help="the classifier's recipe, whose model the from-scratch runs build too (e.g. cifar10_budget: a conv "
        "tokenizer; default: vitkit train's defaults, the plain patch-4 ViT)",
    )
    p.add_argument("--finetune-lr", type=float, help="the fine-tuned runs' peak lr (default: finetune's, 5e-4)")
    p.add_argument(
        "--layer-decay", type=float, help="the fine-tuned runs' layer-wise lr decay (default: finetune's, 0.75; 1: off)"
    )
    p.add_argument("--pretrain-minutes", type=float, help="the classifier's budget when trained here (default 10)")
    p.add_argument("--classifier-photos", type=int, help="photos the classifier trains on (default: all its 40,000)")
    p.add_argument("--data", default=DEFAULT_CIFAR10, help=f"CIFAR-10 train archive (default {DEFAULT_CIFAR10})")
    p.add_argument("--photos", type=int, help="photos in a task set (default: all the 10,000 set aside)")
    p.add_argument("--val-photos", type=int, help="of those, the photos in the validation images (default 1500)")
    p.add_argument("--work", help="where the sets, the runs and the models go (default runs/bench-heads[-quick])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", help="append the records to this JSON Lines file (e.g. benchmarks/results/heads.jsonl)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.work = args.work or ("runs/bench-heads-quick" if args.quick else "runs/bench-heads")
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    args.tasks = list(TASKS) if args.task == "all" else [args.task]
    if not 0 < args.val_photos < args.photos <= FULL["photos"]:
        p.error(f"need 0 < --val-photos < --photos <= {FULL['photos']}, got {args.val_photos} and {args.photos}")
    if not 0 < args.classifier_photos <= FULL["classifier_photos"]:
        p.error(f"--classifier-photos must be in 1..{FULL['classifier_photos']}, got {args.classifier_photos}")
    if args.minutes <= 0 or args.pretrain_minutes <= 0:
        p.error(f"budgets must be positive, got --minutes {args.minutes}, --pretrain-minutes {args.pretrain_minutes}")
    bad_heads = sorted(set(args.heads) - {"linear", "pyramid"})
    if "segment" in args.tasks and (bad_heads or not args.heads):
        p.error(f"--heads takes linear and/or pyramid, got {bad_heads or 'none'}")
    if args.source and not Path(args.source).is_file():
        p.error(f"--from '{args.source}' is not a file (a classification .safetensors)")
    return args


def main() -> int:
    args = parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    if args.source:
        classifier = {"path": args.source, "seconds": None, "val_top1": None, "origin": "given"}
    else:
        classifier = pretrain_classifier(
            args.data,
            Path(args.work),
            args.pretrain_minutes,
            args.classifier_photos,
            args.seed,
            args.quiet,
            args.recipe,
        )
    for task in args.tasks:
        built, rows = run_task(args, task, classifier["path"])
        print_table(task, rows, args.minutes)
        figures = {
            "task": task,
            "quick": args.quick,
            "minutes": args.minutes,
            "classifier": classifier,
            "pretrain_minutes": None if args.source else args.pretrain_minutes,
            "recipe": args.recipe,
            "finetune": {"lr": args.finetune_lr, "layer_decay": args.layer_decay},
            "set": built,
            "machine": machine(),
            "rows": rows,
        }
        print(json.dumps(figures))
        if args.out:
            append_record(args.out, "heads", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
