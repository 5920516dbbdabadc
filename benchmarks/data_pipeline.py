"""Data pipeline speed: the one-time decode cache, its reload, augmentation throughput per recipe, and streaming.

Measures, on the machine it runs on:
  1. `load_source(TAR)` into an empty cache folder (stream the archive, decode every JPEG, write the memmap),
     then again (read the cache), and a full pass over the cached pixels;
  2. images/s of vitkit's batched train transforms at the data's size (batch 256) for crop + flip,
     + RandAugment, + TrivialAugmentWide, + RandAugment + RandomErasing + MixUp/CutMix, and AutoAugment, next to
     the same recipes done the usual torchvision way (one `v2.Compose` call per image, then v2.MixUp/CutMix);
  3. the BatchLoader end to end (gather from the memmap + transform);
  4. streaming at 224 px, on full-resolution JPEG photos written as tar shards (`vitkit shard`): JPEG decoding
     alone (torchvision.io.decode_jpeg vs PIL), the streaming pipeline (decode + RandomResizedCrop from the full
     image in 1 and 2 worker processes, RandAugment on the batch) against the cached path (a 224-px decode cache,
     RandomResizedCrop + RandAugment on the batch) and against the ViT-S/16 training step, so it shows whether
     input or compute bounds training here;
  5. the memory of streaming one epoch of a source whose decode cache would pass the limit: the memory (PSS) of
     the training process and its workers through the epoch, for the whole source and for half of it (flat: it
     does not grow with the data). It runs before section 4, while no model is held in the process.

    .venv/bin/python benchmarks/data_pipeline.py [--data ARCHIVE]   # default: the CIFAR-10 train archive
    .venv/bin/python benchmarks/data_pipeline.py --quick            # every section, small and short (a smoke test)
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from machine import DEFAULT_CIFAR10, cpu_model  # benchmarks/machine.py (this folder is on sys.path)
from PIL import Image
from torchvision.transforms import v2

from vitkit.config import PreprocessConfig
from vitkit.data.decode import decode_image
from vitkit.data.loader import BatchLoader
from vitkit.data.shard_writer import write_shards
from vitkit.data.sources import decode_workers, load_source
from vitkit.data.stream_sources import estimated_cache_bytes, format_size, open_stream_source
from vitkit.data.streaming import ShardLoader, TrainCrop, batch_augment, decode_tensor
from vitkit.data.transforms import AugmentConfig, build_train_transform

PHOTO_SIZES = ((375, 500), (500, 375), (480, 640), (500, 333))  # (H, W) of the synthetic photos, ImageNet-like


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


# ------------------------------------------------------------------------------------- 1-3: the decode cache
def cache_sections(args: argparse.Namespace) -> None:
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

        aug = AugmentConfig(auto_augment="randaugment", **mix)
        loader = BatchLoader(ds, None, args.batch, seed=0, transform=build_train_transform(aug, pre, k, 3))
        it = (b for _ in range(10**6) for b in loader)  # epoch after epoch: a small archive runs out
        ips = rate(lambda: next(it), args.batch, args.seconds)
        print(f"\n== BatchLoader (memmap gather + RandAugment + erasing + MixUp/CutMix): {ips:,.0f} img/s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ------------------------------------------------------------------------------------- 4-5: streaming
def synthetic_photo(i: int) -> bytes:
    """A JPEG (quality 90) the size of an ImageNet photo: smooth colour fields, edges and sensor-like noise, so it
    compresses and decodes like a photograph (~100 KB) rather than like flat colour or pure noise."""
    h, w = PHOTO_SIZES[i % len(PHOTO_SIZES)]
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.04, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 128 + 90 * np.sin(xx * fx + phase) * np.cos(yy * fy)
    img[(xx // rng.integers(20, 80) + yy // rng.integers(20, 80)) % 2 == 0] *= 0.7  # blocky edges
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_photo_shards(root: Path, n: int, classes: int = 10) -> str:
    """`n` synthetic photos in class folders, written as shards by `vitkit shard` (16 MB each); the pattern."""
    for i in range(n):
        folder = root / "photos" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(synthetic_photo(i))
    report = write_shards(str(root / "photos"), root / "shards", max_size=16 * 10**6, progress=False)
    return report.pattern


def stream_rate(src, indices, batch: int, workers: int, aug: AugmentConfig, pre, seconds: float, k: int) -> float:
    """Images/s of a streamed training loader: workers decode + crop, this process runs RandAugment on the batch."""
    loader = ShardLoader(
        src,
        indices,
        batch,
        train=True,
        op=TrainCrop(aug, pre),
        transform=build_train_transform(batch_augment(aug), pre, k, 3),
        workers=workers,
    )
    batches = (b for _ in range(10**6) for b in loader)
    return rate(lambda: next(batches), batch, seconds)


def model_step_rate(batch: int, steps: int) -> float:
    """Images/s of ViT-S/16 training steps at 224 px (bf16 autocast, AdamW), on the threads torch uses by default."""
    from vitkit import create_model
    from vitkit.train.loop import autocast

    model = create_model("vit_small_patch16_224", num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast("bf16", torch.device("cpu")):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    step()  # warm-up: allocations, kernel choice
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def decode_rates(datas: list[bytes], seconds: float) -> tuple[float, float]:
    """Images/s decoding JPEGs with vitkit's streaming decoder (torchvision.io.decode_jpeg) and with PIL."""
    tv = rate(lambda: [decode_tensor(d, "x.jpg") for d in datas], len(datas), seconds)
    pil = rate(lambda: [decode_image(d) for d in datas], len(datas), seconds)
    return tv, pil


def stream_section(args: argparse.Namespace, root: Path, pattern: str) -> None:
    torch.set_num_threads(args.threads)
    src = open_stream_source(pattern, cache_dir=root / "cache", progress=False)
    k, batch = src.num_classes, args.stream_batch
    pre = PreprocessConfig(input_size=(224, 224), interpolation="bilinear")
    aug = AugmentConfig(random_resized_crop=True, auto_augment="randaugment")
    datas = [synthetic_photo(i) for i in range(16)]
    tv, pil = decode_rates(datas, args.seconds)
    print(
        f"\n== streaming at 224 px: {len(src)} synthetic photos ({len(src.index.shards)} shards, "
        f"{np.mean([len(d) for d in datas]) / 1e3:.0f} kB a JPEG), batch {batch}, main process {args.threads} "
        "thread(s), images/s"
    )
    print(f"{'JPEG decode only, torchvision.io.decode_jpeg (1 process)':62s} {tv:10,.0f}")
    print(f"{'JPEG decode only, PIL (1 process)':62s} {pil:10,.0f}")
    streams = {}
    for workers in args.workers:
        streams[workers] = stream_rate(src, None, batch, workers, aug, pre, args.stream_seconds, k)
        label = f"stream: decode + RRC in {workers} worker(s), RandAugment on the batch"
        print(f"{label:62s} {streams[workers]:10,.0f}")

    t0 = time.perf_counter()
    cached = load_source(pattern, cache_dir=root / "cache", image_size=224, progress=False)
    build = time.perf_counter() - t0
    tf = build_train_transform(aug, PreprocessConfig(input_size=(224, 224)), k, 3)
    it = (b for _ in range(10**6) for b in BatchLoader(cached, None, batch, seed=0, transform=tf))
    cache_ips = rate(lambda: next(it), batch, args.stream_seconds)
    label = "cache (224-px array): RRC + RandAugment on the batch"
    print(f"{label:62s} {cache_ips:10,.0f}   (built once in {build:.1f} s, {cached.images.nbytes / 2**20:,.0f} MiB)")

    torch.set_num_threads(os.cpu_count() or 1)
    model = model_step_rate(args.model_batch, args.model_steps)
    print(
        f"{f'ViT-S/16 training step, bf16, batch {args.model_batch}, {torch.get_num_threads()} threads':62s} "
        f"{model:10,.1f}"
    )
    best = max(streams.values())
    bound = "compute (the model step)" if best >= model else "input (the streaming pipeline)"
    print(f"-> {bound} bounds ViT-S/16 training here: streaming {best / model:.1f}x the model's pace")


def pss_mib(pid: int) -> float:
    """Proportional set size of a process in MiB: its resident pages, the ones it shares counted by share. Forked
    workers share the training process's pages; their resident sizes would count those once per worker."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        except OSError:
            continue
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def epoch_memory(src, indices, batch: int, workers: int, pre, k: int) -> list[tuple[float, float, float]]:
    """(fraction of the epoch, training process MiB, its workers' MiB: PSS) sampled through one epoch."""
    aug = AugmentConfig(random_resized_crop=True, auto_augment="randaugment")
    loader = ShardLoader(
        src,
        indices,
        batch,
        train=True,
        op=TrainCrop(aug, pre),
        transform=build_train_transform(batch_augment(aug), pre, k, 3),
        workers=workers,
    )
    n, samples = len(loader), []
    for i, _ in enumerate(loader):
        if i % max(n // 8, 1) == 0 or i == n - 1:
            me = os.getpid()
            samples.append(((i + 1) / n, pss_mib(me), sum(pss_mib(c) for c in children(me))))
    loader.close()
    return samples


def memory_section(args: argparse.Namespace, root: Path, pattern: str) -> None:
    src = open_stream_source(pattern, cache_dir=root / "cache", progress=False)
    full = estimated_cache_bytes(src, None)
    limit = full // 4  # the cache limit this section pretends to have: the source is 4x larger
    print(
        f"\n== memory, one epoch streamed: {len(src)} photos would decode to {format_size(full)} at full size, "
        f"over a cache limit of {format_size(limit)}; batch {args.stream_batch}, {max(args.workers)} worker(s)"
    )
    pre = PreprocessConfig(input_size=(224, 224), interpolation="bilinear")
    print(f"{'source':22s} {'epoch':>6s} {'process PSS MiB':>16s} {'workers PSS MiB':>16s} {'total MiB':>10s}")
    halves = (("half (first shards)", np.arange(len(src) // 2)), ("whole", None))
    for name, indices in halves:
        samples = epoch_memory(src, indices, args.stream_batch, max(args.workers), pre, src.num_classes)
        for frac, me, kids in samples:
            print(f"{name:22s} {frac:6.0%} {me:16,.0f} {kids:16,.0f} {me + kids:10,.0f}")
        print(f"{name:22s} {'peak':>6s} {'':16s} {'':16s} {max(me + kids for _, me, kids in samples):10,.0f}")


def tiny_archive(root: Path, n: int = 512) -> str:
    """A .tar of `n` 32-px noise PNGs in 10 class folders: the cache sections' data for --quick."""
    import tarfile

    path = root / "tiny.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            info = tarfile.TarInfo(f"tiny/class{i % 10}/{i:05d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", help=f"an image archive (default {DEFAULT_CIFAR10}; with --quick, a small archive made here)"
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the transforms")
    ap.add_argument("--photos", type=int, default=2048, help="synthetic full-resolution photos for sections 4-5")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decoder processes to measure")
    ap.add_argument("--stream-batch", type=int, default=64, help="batch of the streaming sections")
    ap.add_argument("--stream-seconds", type=float, default=20.0, help="measuring time per streaming configuration")
    ap.add_argument("--model-batch", type=int, default=32)
    ap.add_argument("--model-steps", type=int, default=5)
    ap.add_argument("--skip-cache", action="store_true", help="only the streaming sections (4-5)")
    ap.add_argument("--quick", action="store_true", help="every section small and short: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seconds, args.photos, args.stream_batch = 64, 0.3, 96, 16
        args.stream_seconds, args.model_batch, args.model_steps = 2.0, 4, 1
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"torch threads: {args.threads}; decoder processes: {decode_workers()}; batch {args.batch}")
    root = Path(tempfile.mkdtemp(prefix="vitkit-bench-stream-"))
    try:
        if not args.skip_cache:
            args.data = args.data or (tiny_archive(root) if args.quick else DEFAULT_CIFAR10)
            cache_sections(args)
        t0 = time.perf_counter()
        pattern = write_photo_shards(root, args.photos)
        print(f"\n(wrote {args.photos} synthetic photos as shards in {time.perf_counter() - t0:.1f} s: {pattern})")
        memory_section(args, root, pattern)  # first: a lean process, as a training run's before its model
        stream_section(args, root, pattern)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
