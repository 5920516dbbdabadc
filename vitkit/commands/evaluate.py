"""vitkit evaluate: a checkpoint's metrics on labelled images, as its task defines them (a classifier: top-1, top-5,
per-class accuracy (recall) and a confusion-matrix PNG; a multi-label model: mAP, per-class AP and F1)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

HELP = "evaluate a checkpoint on labelled images: top-1/top-5/per-class accuracy and a confusion-matrix PNG"


def plot_name(data: str) -> str:
    """A file-name-safe stem for `data`: "cifar10-train" for an archive path, "train" for a shard pattern such
    as 'shards/train-{000000..000009}.tar' (braces, colons of hf: names and other punctuation would make odd or
    invalid file names)."""
    stem = Path(data.rstrip("/")).name.split("{")[0].split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-") or "data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", help="a .safetensors model, a run folder (its model.safetensors), a last.ckpt or a Hub name"
    )
    p.add_argument("--data", required=True, help="labelled images: folder, .tar(.gz), .csv, digits, cifar10...")
    p.add_argument(
        "--val-split",
        type=float,
        default=None,
        help="evaluate only the stratified held-out fraction a training run with this split used",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that split (default 0, as `vitkit train`)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32", "int8"),
        default="bf16",
        help="int8: the block linears in int8, scored beside bf16 (a float checkpoint: quantized here, calibrated "
        "on --calib or dynamic; a `vitkit quantize` output runs as it is)",
    )
    p.add_argument("--calib", help="--precision int8: calibration images (any --data spec; default: dynamic)")
    p.add_argument("--calib-images", type=int, default=256, help="images drawn from --calib (default 256)")
    p.add_argument("--cache-dir", help="decode cache folder")
    p.add_argument("--confusion", help="where to write the confusion-matrix PNG (default: next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, per_class) last")
    p.add_argument(
        "--tta",
        nargs="?",
        const="flip",
        default=None,
        choices=("flip", "flip-translate"),
        help="test-time augmentation: flip (bare --tta) averages each image's logits with its mirror image's; "
        "flip-translate also the mirror pairs shifted one pixel up-left and down-right (weights 0.5 / 0.25 / 0.25; "
        "classifiers only)",
    )
    p.add_argument("--threshold", type=float, help="multi-label models: the F1 threshold (default: the checkpoint's)")
    frozen = p.add_argument_group(
        "frozen features (any encoder, labels or not): a stratified split of --data, the --val-split part "
        "(default 0.1) the queries, the rest the k-NN memory bank / the probe's training set"
    )
    frozen.add_argument(
        "--knn", action="store_true", help="cosine k-NN accuracy of the pooled features (votes weighted exp(sim/0.07))"
    )
    frozen.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    frozen.add_argument("--probe", action="store_true", help="linear-probe accuracy (logistic regression, L-BFGS)")
    search = p.add_argument_group(
        "retrieval (any encoder): --data's images are the queries (its --val-split part if given) and --gallery the "
        "images searched; without --gallery, a stratified split of --data (--val-split, default 0.1, the queries)"
    )
    search.add_argument("--retrieval", action="store_true", help="recall@1/5 of cosine search over pooled features")
    search.add_argument("--gallery", help="labelled images to search (folder, .tar, .csv, digits, ...)")


def load_any(path: str):
    """A model from a .safetensors / foreign checkpoint, a run folder, a training checkpoint (.ckpt) or a Hub name."""
    from ..interop import from_pretrained
    from ..train.checkpoint import model_from_checkpoint

    p = Path(path)
    if not p.exists():  # a Hub name (from_pretrained says what is wrong if not); outputs go to the working folder
        return from_pretrained(path), Path(path.rsplit("/", 1)[-1])
    if p.is_dir():
        p = p / "model.safetensors" if (p / "model.safetensors").is_file() else p / "last.ckpt"
    if p.suffix == ".ckpt":
        return model_from_checkpoint(p), p
    return from_pretrained(p), p


def run(args: argparse.Namespace) -> int:
    from ..infer.evaluate import TaskReport, evaluate_model
    from ..optional import available, require
    from ..quant import is_quantized
    from ..tasks import task_of

    if args.retrieval:
        return run_retrieval(args)
    if args.knn or args.probe:
        return run_frozen(args)
    plot = available("matplotlib")
    if args.confusion and not plot:  # asked for by name: fail now, not after the evaluation
        require("matplotlib", "--confusion (the confusion-matrix plot)")
    model, ckpt = load_any(args.checkpoint)
    if not model.labels:
        raise ValueError(f"'{ckpt}' has no class names; evaluate needs a model trained with labels")
    task = task_of(model)  # the data is read, and the model judged, as its task says (a classifier by default)
    if args.threshold is not None:
        if not hasattr(task, "threshold"):
            raise ValueError(f"--threshold applies to multi-label models; '{ckpt}' is a '{task.name}' model")
        task = dataclasses.replace(task, threshold=args.threshold)
    ds = task.read(args.data, cache_dir=args.cache_dir, progress=not args.json, classes=model.labels)
    indices = None
    if args.val_split:
        _, indices = task.split(ds.labels, args.val_split, args.seed)
    data_name = plot_name(args.data)
    png = Path(args.confusion) if args.confusion else ckpt.parent / f"confusion_{data_name}.png"
    if not plot:  # the default plot is a nicety: the numbers below are the result
        print("confusion-matrix plot skipped: matplotlib is not installed (pip install matplotlib)")
        png = None
    int8 = args.precision == "int8" or is_quantized(model)
    reference = None  # int8: the float model's bf16 report, beside the int8 one
    if int8 and not is_quantized(model):
        reference = evaluate_model(model, ds, indices, batch_size=args.batch_size, precision="bf16", tta=args.tta,
                                   task=task)  # fmt: skip
        model = quantized_for_evaluation(model, args)
    report = evaluate_model(
        model,
        ds,
        indices,
        batch_size=args.batch_size,
        precision="int8" if int8 else args.precision,
        confusion_png=png,
        tta=args.tta,
        task=task,
    )
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} unreadable file(s), e.g. {ds.skipped[0][0]}: {ds.skipped[0][1]}")
    print(f"{ckpt} on {ds.source}: {report.n} images" + (f", {describe_int8(model)}" if int8 else ""))
    if isinstance(report, TaskReport):
        print_task_report(report)
    else:
        print_classification(report)
    if int8:
        print_int8_comparison(report, reference)
    if report.confusion_png is not None:
        print(f"confusion matrix: {report.confusion_png}")
    if args.json:
        result = report.to_dict()
        if int8:
            result |= {"precision": "int8", "quantization": model.quantization}
            result["bf16"] = None if reference is None else reference.to_dict()
        print(json.dumps(result))
    return 0


def quantized_for_evaluation(model, args: argparse.Namespace):
    """The int8 copy `evaluate --precision int8` scores: calibrated on --calib images drawn outside the --val-split
    part (so no scored image set a grid), or with dynamic activations without --calib."""
    from ..quant import quantize_calibrated, quantize_model

    if not args.calib:
        return quantize_model(model)
    return quantize_calibrated(
        model, args.calib, args.calib_images, val_split=args.val_split, seed=args.seed, cache_dir=args.cache_dir,
        progress=not args.json,
    )  # fmt: skip


def describe_int8(model) -> str:
    calib = model.quantization.get("calibration")
    if calib:
        return f"int8 (activations calibrated on {calib['images']} images of {calib['source']})"
    return f"int8 ({model.quantization['activations']} activations)"


def print_int8_comparison(report, reference) -> None:
    """int8 against bf16: top-1 (a classifier) or every single number (other tasks), and the difference."""
    from ..infer.evaluate import TaskReport

    if reference is None:
        print("bf16: not scored (this file holds int8 weights only; evaluate the float checkpoint it was quantized "
              "from with --precision int8 --calib ... to see both)")  # fmt: skip
        return
    if isinstance(report, TaskReport):
        ours, theirs = report.result, reference.result
        keys = [k for k, v in ours.items() if isinstance(v, float)]
        print("bf16: " + "   ".join(f"{k} {theirs[k]:.4f}" for k in keys))
        print("int8 - bf16: " + "   ".join(f"{k} {ours[k] - theirs[k]:+.4f}" for k in keys))
        return
    print(f"top-1 int8 {report.top1:.2%}   bf16 {reference.top1:.2%}   difference "
          f"{100 * (report.top1 - reference.top1):+.2f} points")  # fmt: skip


def print_classification(report) -> None:
    """Top-1 / top-k, then per class its accuracy, i.e. its recall, and its image count; their mean last."""
    print(f"top-1 {report.top1:.2%}   top-{min(5, len(report.classes))} {report.top5:.2%}   loss {report.loss:.4f}")
    width = max(len(c) for c in report.classes)
    print(f"  {'class':<{width}}   recall  images")
    for name, acc in report.per_class.items():
        print(f"  {name:<{width}}  {'-' if acc is None else f'{acc:.2%}':>7}  {report.support.get(name, 0):>6}")
    if report.mean_recall is not None:
        print(f"mean recall (balanced accuracy) {report.mean_recall:.2%}")


def print_task_report(report) -> None:
    """The task's single numbers on one line, then its per-class numbers as a table (multi-label: AP and F1)."""
    res = report.result
    print("   ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
    columns = [k for k, v in res.items() if isinstance(v, list) and len(v) == len(report.classes)]
    width = max(len(c) for c in report.classes)
    print(f"  {'class':<{width}}  " + "  ".join(f"{c:>14}" for c in columns))
    for i, name in enumerate(report.classes):
        cells = ("-" if res[c][i] is None else f"{res[c][i]:.4f}" for c in columns)
        print(f"  {name:<{width}}  " + "  ".join(f"{cell:>14}" for cell in cells))


def run_frozen(args: argparse.Namespace) -> int:
    """--knn / --probe: judge the checkpoint's frozen pooled features; its head and class names play no part."""
    from ..data.sources import load_source
    from ..infer.frozen import QUERY_FRACTION, frozen_eval

    model, ckpt = load_any(args.checkpoint)
    ds = load_source(args.data, cache_dir=args.cache_dir, progress=not args.json)
    report = frozen_eval(
        model,
        ds,
        knn=args.knn,
        probe=args.probe,
        k=args.k,
        query_fraction=args.val_split or QUERY_FRACTION,
        seed=args.seed,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    print(f"{ckpt} on {ds.source}: {report.bank} bank / {report.queries} query images, {len(ds.classes)} classes")
    if report.knn_top1 is not None:
        print(f"k-NN (k={report.k}) top-1 {report.knn_top1:.2%}")
    if report.probe_top1 is not None:
        print(f"linear probe top-1 {report.probe_top1:.2%}")
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0


def run_retrieval(args: argparse.Namespace) -> int:
    """--retrieval: recall@1/5 of labelled queries against a labelled gallery; the head plays no part."""
    from ..data.sources import load_source
    from ..infer.frozen import QUERY_FRACTION, split_bank_queries
    from ..infer.retrieval import evaluate_retrieval

    model, ckpt = load_any(args.checkpoint)
    queries = load_source(args.data, cache_dir=args.cache_dir, progress=not args.json)
    if args.gallery:
        gallery, gallery_idx = load_source(args.gallery, cache_dir=args.cache_dir, progress=not args.json), None
        query_idx = split_bank_queries(queries.labels, args.val_split, args.seed)[1] if args.val_split else None
    else:  # one source: the held-out part searches the rest, so no query finds itself
        gallery = queries
        gallery_idx, query_idx = split_bank_queries(queries.labels, args.val_split or QUERY_FRACTION, args.seed)
    report = evaluate_retrieval(
        model, queries, gallery, query_idx, gallery_idx, batch_size=args.batch_size, precision=args.precision
    )
    print(f"{ckpt}: {report.queries} queries from {queries.source} against {report.gallery} from {gallery.source}")
    print("   ".join(f"recall@{k} {v:.2%}" for k, v in report.recall.items()))
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0
