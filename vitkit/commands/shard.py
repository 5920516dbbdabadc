"""vitkit shard: write an image folder, tar, CSV or Hugging Face dataset as WebDataset tar shards for streaming."""

from __future__ import annotations

import argparse
import sys

HELP = "write a folder / tar / CSV / datasets source as WebDataset tar shards (label in .cls, classes.json beside)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="image folder (root/<class>/img.jpg), .tar(.gz) of one, .csv of path,label, tar "
        "shards, or a Hugging Face dataset (hf:NAME, a save_to_disk folder, .parquet files)",
    )
    p.add_argument("out", help="folder to write PREFIX-000000.tar, PREFIX-000001.tar, ... and classes.json into")
    p.add_argument("--max-size", default="1GB", help="largest shard, e.g. 1GB, 500MB (default: 1GB)")
    p.add_argument("--max-count", type=int, help="most samples in a shard (default: no limit)")
    p.add_argument("--prefix", default="train", help="shard file names start with this (default: train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order the samples are written in")
    p.add_argument(
        "--no-shuffle", dest="shuffle", action="store_false", help="keep the source's order (shuffled by default)"
    )
    p.add_argument("--cache-dir", help="where a shard index or converted parquet files are kept")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.shard_writer import write_shards
    from ..data.stream_sources import format_size, parse_size

    report = write_shards(
        args.source,
        args.out,
        max_size=parse_size(args.max_size),
        max_count=args.max_count,
        prefix=args.prefix,
        shuffle=args.shuffle,
        seed=args.seed,
        cache_dir=args.cache_dir,
        progress=args.progress,
    )
    for name, reason in report.skipped[:10]:
        print(f"vitkit shard: skipped {name}: {reason}", file=sys.stderr)
    if len(report.skipped) > 10:
        print(f"vitkit shard: ... {len(report.skipped) - 10} more skipped", file=sys.stderr)
    total = sum(p.stat().st_size for p in report.shards)
    order = "in a shuffled order" if report.shuffled else "in the source's order"
    print(
        f"wrote {report.samples} images of {len(report.classes)} classes {order} into {len(report.shards)} shard(s) "
        f"({format_size(total)}), class names in {report.shards[0].parent / 'classes.json'}"
    )
    print(f"train on them: vitkit train --data '{report.pattern}'")
    return 0
