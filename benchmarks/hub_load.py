"""Loading a cached model by Hub name vs loading the same files from a local folder.

    .venv/bin/python benchmarks/hub_load.py [--model vit_small_patch16_224] [--reps 7]

A timm Hub folder of `--model` (random weights, timm's own `save_for_hf`) is served by the Hub stand-in of
tests/hub_server.py on 127.0.0.1 and downloaded once by name. Then, taking turns so that load from other processes
hits them alike, it times `vitkit.from_pretrained` of: the local folder; the name read from the cache only
(`local_files_only=True`, as with HF_HUB_OFFLINE=1); and the name with the Hub answering (one `model_info` and one
metadata HEAD per file before the cached files are used: on the real Hub add those round trips). Prints the median
of each and its ratio to the local folder, then the time the name itself costs: finding its files in the cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from machine import cpu_model  # benchmarks/machine.py; scripts run as `python benchmarks/<name>.py`

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vitkit  # noqa: E402
from tests.hub_server import HubServer, point_huggingface_hub_at  # noqa: E402
from vitkit.interop.hub import locate  # noqa: E402

REPO_ID = "timm/bench-vit"


def median_seconds(loaders: dict, reps: int) -> dict[str, float]:
    """Median seconds of each loader, after one warm-up call each, taking turns (each round starts with another)."""
    for load in loaders.values():
        load()
    times: dict[str, list[float]] = {k: [] for k in loaders}
    names = list(loaders)
    for rep in range(reps):
        for k in names[rep % len(names) :] + names[: rep % len(names)]:
            load = loaders[k]
            t0 = time.perf_counter()
            load()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    import huggingface_hub
    import timm
    from timm.models import save_for_hf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm name of the model to save and load")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    print(f"{cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, huggingface_hub {huggingface_hub.__version__}")

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
        folder = Path(tmp) / "local"
        save_for_hf(timm.create_model(args.model, pretrained=False), str(folder), safe_serialization=True)
        size_mb = (folder / "model.safetensors").stat().st_size / 2**20
        server = HubServer().start()
        point_huggingface_hub_at(server.url, Path(tmp) / "cache", Path(tmp) / "home", monkeypatch)
        server.add_repo(REPO_ID, folder)
        vitkit.from_pretrained(REPO_ID)  # the one download
        loaders = {
            "local folder": lambda: vitkit.from_pretrained(folder),
            "name, cache only": lambda: vitkit.from_pretrained(REPO_ID, local_files_only=True),
            "name, Hub answering": lambda: vitkit.from_pretrained(REPO_ID),
        }
        medians = median_seconds(loaders, args.reps)
        finding = median_seconds(  # the name's part of it: finding the files, before any of them is read
            {
                "cache only": lambda: locate(REPO_ID, local_files_only=True),
                "Hub answering": lambda: locate(REPO_ID),
            },
            args.reps,
        )
        server.stop()
    base = medians["local folder"]
    print(f"{args.model} ({size_mb:.0f} MiB safetensors), from_pretrained, median of {args.reps}:")
    for k, s in medians.items():
        print(f"  {k:<20} {1000 * s:8.1f} ms   x{s / base:.2f}")
    print("finding the files of the name (vitkit.interop.hub.locate):")
    for k, s in finding.items():
        print(f"  {k:<20} {1000 * s:8.2f} ms")


if __name__ == "__main__":
    main()
