"""Load test for `vitkit serve`, bounded and on loopback only: N requests at C-way concurrency.

Starts its own server (`python -m vitkit serve CKPT --host 127.0.0.1 --port <free>`) as a subprocess, waits for
/healthz, sends a warm-up, records the server's resident memory, fires the requests from C client threads
(httpx, keep-alive), records the memory again and stops the server. Reports p50 / p90 / p99 latency, throughput,
the error count (target 0), the server's mean batch size and RSS before/after. With --compare (default) the same
load also runs against a server with --max-batch 1, in the same process, so the batching gain is a ratio measured
side by side. The client threads share the machine's cores with the server: figures are end-to-end on one box.

With --api-key the comparison is instead the cost of authentication: two servers, one without a key and one with
--api-key-file (its clients send `Authorization: Bearer`), both up at once and loaded in turns (off, on, on, off, ...
for --rounds rounds, so drift in the machine's pace hits both alike); it prints the ratio of the medians
(target: no more than 2 % slower with the key).

    .venv/bin/python benchmarks/serve_load.py                                          # 1,000 x 8, demo model
    .venv/bin/python benchmarks/serve_load.py --endpoint explain --requests 300
    .venv/bin/python benchmarks/serve_load.py --api-key --rounds 3                     # key off vs on

Checkpoint: --checkpoint, else runs/demo/model.safetensors (`vitkit demo --out runs/demo` makes it in ~1 min),
else a small random ViT (vit_cifar_patch4_32 shape, 10 classes) written to a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py; scripts run as `python benchmarks/<name>.py`
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"  # loopback only, by design


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_images(n: int = 16, seed: int = 0) -> list[bytes]:
    """n distinct small PNGs (flat colour + a block, 96x72) so caching can not help."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        a = np.zeros((72, 96, 3), np.uint8)
        a[:] = rng.randint(0, 256, 3)
        y, x = rng.randint(0, 40, 2)
        a[y : y + 30, x : x + 50] = rng.randint(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def pick_checkpoint(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    demo = ROOT / "runs" / "demo" / "model.safetensors"
    if demo.is_file():
        return demo, "demo (runs/demo)"
    import vitkit

    model = vitkit.create_model("vit_cifar_patch4_32")
    model.labels = [f"class{i}" for i in range(10)]
    return model.save(tmp / "random_cifar.safetensors"), "random vit_cifar_patch4_32 (no runs/demo checkpoint)"


class Server:
    """`vitkit serve` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, max_batch: int, key_file: Path | None = None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "vitkit", "serve", str(checkpoint), "--host", HOST, "--port", str(self.port),
               "--max-batch", str(max_batch), "--no-access-log", "--log-level", "warning"]  # fmt: skip
        if key_file is not None:
            cmd += ["--api-key-file", str(key_file)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, client, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if client.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_load(
    url: str, endpoint: str, images: list[bytes], requests: int, concurrency: int, headers: dict | None = None
) -> dict:
    """Fire `requests` POSTs from `concurrency` threads; per-request latency and status."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=60, headers=headers) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/{endpoint}", files={"file": (f"img{i}.png", images[i % len(images)])})
                    ok = r.status_code == 200
                    detail = f"HTTP {r.status_code}: {r.text[:120]}"
                except Exception as e:  # connection trouble counts as an error, the load goes on
                    ok, detail = False, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    if not ok:
                        errors.append(detail)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall,
        "throughput": len(latencies) / wall,
        "p50_ms": q[49] * 1e3,
        "p90_ms": q[89] * 1e3,
        "p99_ms": q[98] * 1e3,
        "max_ms": max(latencies) * 1e3,
    }


def measure(checkpoint: Path, max_batch: int, args, images: list[bytes]) -> dict:
    import httpx

    server = Server(checkpoint, max_batch)
    try:
        with httpx.Client(timeout=60) as client:
            server.wait_ready(client)
            for im in images[:4]:  # warm-up: first-call allocations and kernel selection
                client.post(f"{server.url}/{args.endpoint}", files={"file": ("warm.png", im)}).raise_for_status()
            rss_before = rss_mib(server.proc.pid)
            res = run_load(server.url, args.endpoint, images, args.requests, args.concurrency)
            rss_after = rss_mib(server.proc.pid)
            health = client.get(server.url + "/healthz").json()
    finally:
        server.stop()
    res.update(max_batch=max_batch, rss_before=rss_before, rss_after=rss_after, mean_batch=health["mean_batch"])
    res.update(model=health["model"], key="off")
    return res


def write_key_file(folder: Path) -> tuple[Path, str]:
    key = secrets.token_urlsafe(32)
    path = folder / "api.key"
    path.write_text(key)
    path.chmod(0o600)
    return path, key


def measure_key_overhead(checkpoint: Path, args, images: list[bytes], key_folder: Path) -> list[dict]:
    """The same load on a server without a key and one with, in turns (off on, on off, ...): one result per load."""
    import httpx

    key_file, key = write_key_file(key_folder)
    servers = {"off": Server(checkpoint, args.max_batch), "on": Server(checkpoint, args.max_batch, key_file)}
    headers = {"off": None, "on": {"Authorization": f"Bearer {key}"}}
    runs = []
    try:
        with httpx.Client(timeout=60) as client:
            for mode, server in servers.items():
                server.wait_ready(client)
                for im in images[:4]:  # warm-up: first-call allocations and kernel selection
                    client.post(f"{server.url}/{args.endpoint}", files={"file": ("warm.png", im)},
                                headers=headers[mode]).raise_for_status()  # fmt: skip
            for r in range(args.rounds):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    server = servers[mode]
                    rss_before = rss_mib(server.proc.pid)
                    res = run_load(server.url, args.endpoint, images, args.requests, args.concurrency, headers[mode])
                    health = client.get(server.url + "/healthz").json()
                    res.update(key=mode, max_batch=args.max_batch, rss_before=rss_before,
                               rss_after=rss_mib(server.proc.pid), mean_batch=health["mean_batch"],
                               model=health["model"])  # fmt: skip
                    runs.append(res)
    finally:
        for server in servers.values():
            server.stop()
    return runs


def key_verdict(runs: list[dict], limit: float = 0.02) -> str:
    """The key's cost from the medians of each mode's loads: throughput and p50 ratios, and the target's verdict."""
    med = {m: {k: statistics.median(r[k] for r in runs if r["key"] == m) for k in ("throughput", "p50_ms")}
           for m in ("off", "on")}  # fmt: skip
    ratio = med["on"]["throughput"] / med["off"]["throughput"]
    met = "met" if ratio >= 1 - limit else "NOT met"
    return (f"api key: throughput x{ratio:.3f} (on / off, medians of {len(runs) // 2} loads each: "
            f"{med['on']['throughput']:.1f} vs {med['off']['throughput']:.1f} req/s), "
            f"p50 x{med['on']['p50_ms'] / med['off']['p50_ms']:.3f}; "
            f"target no more than {limit:.0%} slower: {met}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--endpoint", choices=("predict", "explain"), default="predict")
    ap.add_argument("--no-compare", dest="compare", action="store_false", help="skip the --max-batch 1 run")
    ap.add_argument("--api-key", action="store_true", help="compare a server without and with an API key instead")
    ap.add_argument("--rounds", type=int, default=3, help="--api-key: loads of each server, in turns (default 3)")
    args = ap.parse_args()
    if not 1 <= args.requests <= 20_000 or not 1 <= args.concurrency <= 64 or not 1 <= args.rounds <= 20:
        ap.error("bounded load only: --requests 1..20000, --concurrency 1..64, --rounds 1..20")

    import fastapi
    import httpx
    import torch
    import uvicorn

    import vitkit

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, vitkit {vitkit.__version__}, "
          f"fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, httpx {httpx.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, source = pick_checkpoint(args.checkpoint, Path(tmp))
        images = test_images()
        if args.api_key:
            runs = measure_key_overhead(ckpt, args, images, Path(tmp))
        else:
            runs = [measure(ckpt, args.max_batch, args, images)]
            if args.compare and args.max_batch != 1:
                runs.append(measure(ckpt, 1, args, images))
    m = runs[0]["model"]
    print(f"checkpoint: {ckpt} [{source}]: {m['parameters']:,} parameters, input {m['input_size']}, "
          f"{m['num_classes']} classes")  # fmt: skip
    print(f"load: {args.requests} x POST /{args.endpoint} (96x72 PNG), {args.concurrency} client threads, "
          f"loopback {HOST}, server and clients on the same machine\n")  # fmt: skip
    head = f"{'key':>3} {'max_batch':>9} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
    print(head + f"{'errors':>6} {'mean batch':>10} {'RSS before MiB':>14} {'RSS after MiB':>13}")
    for r in runs:
        print(f"{r['key']:>3} {r['max_batch']:>9} {r['throughput']:>8.1f} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['errors']:>6} {r['mean_batch'] or 0:>10.2f} "
              f"{r['rss_before']:>14.1f} {r['rss_after']:>13.1f}")  # fmt: skip
        for e in r["first_errors"]:
            print(f"  error: {e}")
    if args.api_key:
        print("\n" + key_verdict(runs))
    elif len(runs) == 2:
        a, b = runs
        print(f"\nbatching gain: throughput x{a['throughput'] / b['throughput']:.2f}, "
              f"p99 x{b['p99_ms'] / a['p99_ms']:.2f} lower (max_batch {a['max_batch']} vs 1)")  # fmt: skip
    total_errors = sum(r["errors"] for r in runs)
    print(f"errors: {total_errors} (target 0)")
    sys.exit(1 if total_errors else 0)


if __name__ == "__main__":
    main()
