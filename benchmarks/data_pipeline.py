"""Data pipeline speed: the one-time decode cache, its reload, and augmentation throughput per recipe.

Measures, on the machine it runs on:
  1. `load_source(TAR)` into an empty cache folder (stream the archive, decode every JPEG, write the memmap),
     then again (read the cache), and a full pass over the cached pixels;
  2. images/s of vitkit's batched train transforms at the data's size (batch 256) for crop + flip,
     + RandAugment, + TrivialAugmentWide, + RandAugment + RandomErasing + MixUp/CutMix, and AutoAugment, next to
     the same recipes done the usual torchvision way (one `v2.Compose` call per image, then v2.MixUp/CutMix);
  3. the BatchLoader end to end (gather from the memmap + transform).

    .venv/bin/python benchmarks/data_pipeline.py [--data ARCHIVE]   # default: the CIFAR-10 train archive
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch
import torchvision
from machine import DEFAULT_CIFAR10, cpu_model  # benchmarks/machine.py (this folder is on sys.path)
from torchvision.transforms import v2

from vitkit.config import PreprocessConfig
from vitkit.data.loader import BatchLoader
from vitkit.data.sources import decode_workers, load_source
from vitkit.data.transforms import AugmentConfig, build_train_transform


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{cpu}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, numpy {np.__version__}"
    )


def rate(fn, batch: int, seconds: float) -> float:
    """Images per second of `fn()` (one batch per call), after one warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - start)


def torchvision_per_image(aa: v2.Transform | None, pad: int, size: tuple[int, int], mix: v2.Transform | None):
    """The common torchvision recipe: a Compose called once per image, then MixUp/CutMix on the batch."""
    steps = [v2.RandomCrop(list(size), padding=pad), v2.RandomHorizontalFlip()]
    steps += [aa] if aa is not None else []
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    per_image = v2.Compose(steps)

    def run(x: torch.Tensor, y: torch.Tensor):
        out = torch.stack([per_image(img) for img in x])
        return mix(out, y) if mix is not None else (out, y)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_CIFAR10, help=f"an image archive (default {DEFAULT_CIFAR10})")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the transforms")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"torch threads: {args.threads}; decoder processes: {decode_workers()}; batch {args.batch}")

    # ---- 1. decode cache
    cache = tempfile.mkdtemp(prefix="vitkit-bench-cache-")
    try:
        t0 = time.perf_counter()
        ds = load_source(args.data, cache_dir=cache, progress=False)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = load_source(args.data, cache_dir=cache, progress=False)
        reload = time.perf_counter() - t0
        t0 = time.perf_counter()
        in_ram = np.array(ds.images)  # copies every cached pixel into memory once
        touch = time.perf_counter() - t0
        print(f"\n== decode cache: {ds.source}: {ds.images.shape} uint8, {len(ds.skipped)} skipped")
        print(f"build (read archive + decode + write cache): {build:7.2f} s  ({len(ds) / build:,.0f} img/s)")
        print(f"reload from cache:                            {reload:7.3f} s  ({build / reload:,.0f}x faster)")
        print(f"copy of all cached pixels into RAM:           {touch:7.3f} s  ({in_ram.nbytes / 2**20:,.0f} MiB)")

        # ---- 2. augmentation throughput
        h, w = ds.image_size
        pre = PreprocessConfig(input_size=(h, w), crop_pct=1.0)
        rng = np.random.default_rng(0)
        idx = rng.choice(len(ds), args.batch, replace=False)
        x = torch.from_numpy(np.ascontiguousarray(ds.images[idx])).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(ds.labels[idx])
        k = ds.num_classes
        mix = dict(random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
        tv_mix = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=k), v2.CutMix(alpha=1.0, num_classes=k)])
        rows = [
            ("crop + flip", AugmentConfig(), torchvision_per_image(None, 4, (h, w), None)),
            ("+ RandAugment(2, 9)", AugmentConfig(auto_augment="randaugment"), v2.RandAugment()),
            ("+ TrivialAugmentWide", AugmentConfig(auto_augment="trivialaugment"), v2.TrivialAugmentWide()),
            ("+ RandAugment + erasing + MixUp/CutMix", AugmentConfig(auto_augment="randaugment", **mix), "mix"),
            ("+ AutoAugment (ImageNet policy)", AugmentConfig(auto_augment="autoaugment"), None),
        ]
        print(f"\n== augmentation, {h}x{w} px, batch {args.batch}, images/s (higher is better)")
        print(f"{'recipe':42s} {'vitkit batched':>15s} {'torchvision per-image':>22s} {'ratio':>7s}")
        for name, aug, peer in rows:
            ours = rate(lambda aug=aug: build_train_transform(aug, pre, k, 3)(x, y), args.batch, args.seconds)
            if peer == "mix":
                peer = torchvision_per_image(v2.RandAugment(), 4, (h, w), v2.Compose([tv_mix]))
            elif isinstance(peer, v2.Transform):
                peer = torchvision_per_image(peer, 4, (h, w), None)
            theirs = rate(lambda p=peer: p(x, y), args.batch, args.seconds) if peer is not None else None
            peer_txt = f"{theirs:22,.0f} {ours / theirs:6.1f}x" if theirs else f"{'(same code)':>22s} {'':>7s}"
            print(f"{name:42s} {ours:15,.0f} {peer_txt}")

        # ---- 3. loader end to end
        aug = AugmentConfig(auto_augment="randaugment", **mix)
        loader = BatchLoader(ds, None, args.batch, seed=0, transform=build_train_transform(aug, pre, k, 3))
        it = iter(loader)
        ips = rate(lambda: next(it), args.batch, args.seconds)
        print(f"\n== BatchLoader (memmap gather + RandAugment + erasing + MixUp/CutMix): {ips:,.0f} img/s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
