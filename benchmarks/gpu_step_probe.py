"""Where a GPU training step of the CIFAR-10 GPU recipe goes: input path vs model step (eager and compiled).

    PYTHONPATH=. python3 benchmarks/gpu_step_probe.py [--data runs/gpu_data/cifar10-train.tar.gz] [--dry-run]

Rows (img/s, median of timed steps, synchronised): the loader + GPU augmentation alone; the model step alone
(forward, backward, fused AdamW on one resident batch) in eager and under torch.compile; and the same step with
a `.item()` on the loss each step (what the trainer's non-finite guard does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")


def timed(fn, steps: int, sync) -> float:
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/gpu_data/cifar10-train.tar.gz")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args()
    from vitkit.data.loader import BatchLoader
    from vitkit.data.sources import load_source
    from vitkit.data.transforms import build_train_transform
    from vitkit.train.recipe import build_config

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    B = 8 if args.dry_run else args.batch
    steps = 3 if args.dry_run else 30
    cfg = build_config("cifar10_gpu", data=args.data, out="runs/gpu_step_probe")
    print("device:", torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "| torch", torch.__version__)
    import vitkit

    model = vitkit.create_model(cfg.model, num_classes=10, **cfg.model_kwargs).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=dev.type == "cuda")
    x = torch.randn(B, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (B,), device=dev)

    def step(m, item=False):
        def run():
            with torch.autocast(dev.type, torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if item:
                loss.item()

        return run

    for name, fn in [("model step eager", step(model)), ("model step eager + loss.item()", step(model, True))]:
        fn(), fn()
        s = timed(fn, steps, sync)
        print(f"{name:34s} {B / s:9.0f} img/s ({s * 1e3:.1f} ms)")
    # input path: the decoded dataset, loader + transform with GPU augmentation
    ds = load_source(args.data, progress=False)
    if ds is not None:
        tf = build_train_transform(cfg.augment, model.preprocess, 10, 3, dev if dev.type == "cuda" else None)
        loader = BatchLoader(ds, None, B, transform=tf)
        it = iter(loader)
        next(it)
        s = timed(lambda: next(it), steps, sync)
        print(f"{'loader + augmentation':34s} {B / s:9.0f} img/s ({s * 1e3:.1f} ms)")
    t = time.perf_counter()
    cm = torch.compile(model)
    fn = step(cm)
    fn(), fn()
    sync()
    print(f"compile: {time.perf_counter() - t:.0f} s")
    s = timed(fn, steps, sync)
    print(f"{'model step compiled':34s} {B / s:9.0f} img/s ({s * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
