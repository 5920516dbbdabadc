"""vitkit beside another job: how much slower a training step, predict and serve get when the cores are shared.

Each workload runs alone, and beside a separate process that keeps every core busy (a PyTorch fp32 matmul loop,
one thread per core, OpenMP at its defaults: "the other job"): `beside`, the other job was running before the
workload started; `joined`, it starts once the workload is warm (vitkit has to notice it while running). The
slowdown is the median time per call there over the median time alone with torch's defaults; a fair share of two
cores between two jobs is 2x. Each lever runs in a fresh subprocess, because libgomp reads its environment once,
when torch loads it.

    .venv/bin/python benchmarks/contention.py --levers default,auto --json --out benchmarks/results/contention.jsonl
    .venv/bin/python benchmarks/contention.py --levers default,passive,threads1,auto --conditions alone,beside
    .venv/bin/python benchmarks/contention.py --quick --levers auto --workloads b1   # tiny model: the script works

Workloads: `train` (vit_cifar_patch4_32, batch 128, bf16 autocast, AdamW step), `b32` and `b1` (ViT-S/16 @224 bf16
inference, as `vitkit predict` runs it), `serve` (ViT-S/16 batch-1 requests through `vitkit serve`'s Batcher, whose
model calls run in a worker thread). Levers: LEVERS below. The "x alone" column is a lever's quiet cost (its time
alone over default's; the target allows 3 %). "others" is the most CPU that processes other than the workload and
the other job used during a measurement (cores); one above 0.15 is taken again once the machine is quiet
(`--retries`). `--rounds N` repeats every measurement in N fresh processes and takes the median: a run beside the
other job varies by up to 2x between processes (where the scheduler happens to place the threads).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from machine import append_record, cpu_model  # benchmarks/machine.py (this folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "VITKIT_SPIN_THROTTLE")
CONDITIONS = ("alone", "beside", "joined")


@dataclass(frozen=True)
class Lever:
    """One configuration of the measured process: environment set before torch loads, and its thread setting."""

    env: dict[str, str] = field(default_factory=dict)
    threads: str = ""  # "": torch's default (one per core); a number; "auto": vitkit.threads.configure("auto")
    about: str = ""


LEVERS = {
    "default": Lever(about="torch's defaults: one thread per core, libgomp spins 300,000 rounds before it sleeps"),
    "passive": Lever({"OMP_WAIT_POLICY": "PASSIVE"}, about="waiting OpenMP threads sleep at once"),
    "spin0": Lever({"GOMP_SPINCOUNT": "0"}, about="libgomp's spin count 0 (PASSIVE by another name)"),
    "spin10k": Lever({"GOMP_SPINCOUNT": "10000"}, about="libgomp spins 10,000 rounds before it sleeps"),
    "threads1": Lever(threads="1", about="one thread"),
    "auto-count": Lever(
        {"VITKIT_SPIN_THROTTLE": "0"}, threads="auto", about="--threads auto, one thread per core others leave free"
    ),
    "auto": Lever(
        threads="auto", about="--threads auto: short OpenMP waits while others hold cores (vitkit's default)"
    ),
}


@dataclass(frozen=True)
class Workload:
    about: str
    reps: int
    quick_reps: int


WORKLOADS = {
    "train": Workload("training step vit_cifar_patch4_32, batch 128, bf16", 12, 3),
    "b32": Workload("inference ViT-S/16 @224, batch 32, bf16", 6, 2),
    "b1": Workload("inference ViT-S/16 @224, batch 1, bf16", 40, 4),
    "serve": Workload("serve: ViT-S/16 batch-1 requests through the Batcher's worker thread", 40, 4),
}
WARMUP = 3
DISTURBED_CORES = 0.15  # a measurement during which third processes used more than this is taken again
QUIET_CORES = 0.05
JOIN_SETTLE_S = 1.5  # after the other job starts: vitkit.threads re-reads the load about once a second


# ------------------------------------------------------------------------------------------------ the worker
def make_workload(name: str, quick: bool) -> Callable[[], None]:
    """One call of the workload, built and ready; quick: tiny models (the script's own test)."""
    import torch
    import torch.nn.functional as F

    import vitkit

    torch.manual_seed(0)
    if name == "train":
        batch = 32 if quick else 128
        model = vitkit.create_model("vit_cifar_patch4_32", **(dict(depth=2) if quick else {})).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    size = 64 if quick else 224
    model = vitkit.create_model("vit_small_patch16_224", **(dict(depth=2, img_size=size) if quick else {})).eval()
    x = torch.randn(32 if name == "b32" else 1, 3, size, size)

    def logits(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(images)

    return serve_call(logits, x[0]) if name == "serve" else lambda: logits(x)


def serve_call(logits: Callable, image) -> Callable[[], None]:
    """One request through `vitkit serve`'s Batcher: the model runs in the batcher's worker thread, as served."""
    import torch

    from vitkit.serve.batcher import Batcher

    loop = asyncio.new_event_loop()
    batcher = Batcher(lambda kind: lambda items: list(logits(torch.stack(items))), max_batch=8)
    loop.run_until_complete(batcher.start())
    return lambda: loop.run_until_complete(batcher.submit("predict", image))


def run_worker(args: argparse.Namespace) -> int:
    """Build the workload, warm it up (and with --join keep it running until told to go on), time it."""
    import torch

    said = ""
    if args.threads:
        from vitkit import threads

        said = threads.configure(args.threads)
    fn = make_workload(args.worker, args.quick)
    for _ in range(WARMUP):
        fn()
    if args.join:  # the other job starts now: keep working, as a real run would, until it has run a while
        go = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.readline(), go.set()), daemon=True).start()
        print("warm", flush=True)
        while not go.is_set():
            fn()
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    figures = {"median_s": statistics.median(times), "threads_at_end": torch.get_num_threads(), "threads": said}
    print(json.dumps(figures), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ the other job
def run_hog(size: int) -> int:
    """The other job: fp32 matmuls with torch's defaults until SIGTERM; prints its matmuls per second."""
    import torch

    a = torch.randn(size, size)
    count, stop = 0, threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    a @ a
    print("ready", flush=True)
    t0 = time.perf_counter()
    while not stop.is_set():
        a @ a
        count += 1
    print(json.dumps({"matmuls_per_s": count / (time.perf_counter() - t0)}), flush=True)
    return 0


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any OpenMP / thread setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return {**env, **extra}


def start_hog(size: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--hog", "--hog-size", str(size)]
    hog = subprocess.Popen(cmd, env=clean_env({}), stdout=subprocess.PIPE, text=True)
    if hog.stdout.readline().strip() != "ready":
        raise RuntimeError("the other job did not start")
    time.sleep(1.0)  # its threads are all running before the measured process goes on
    return hog


def stop_hog(hog: subprocess.Popen) -> float:
    hog.send_signal(signal.SIGTERM)
    out, _ = hog.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])["matmuls_per_s"]


# ------------------------------------------------------------------------------------------------ measuring
def children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def measure(workload: str, lever: Lever, condition: str, quick: bool, hog_size: int) -> dict:
    """Median seconds per call of `workload` under `lever` in `condition`, in a fresh process; also the cores
    that processes other than the worker and the other job kept busy meanwhile (a disturbed run shows > ~0.1)."""
    from vitkit.threads import busy_elsewhere, read_cpu_times

    reps = WORKLOADS[workload].quick_reps if quick else WORKLOADS[workload].reps
    cmd = [sys.executable, __file__, "--worker", workload, "--reps", str(reps), "--threads", lever.threads]
    cmd += ["--quick"] * quick + ["--join"] * (condition == "joined")
    before, children = read_cpu_times(), children_cpu_s()
    hog = start_hog(hog_size) if condition == "beside" else None
    try:
        proc = subprocess.Popen(cmd, env=clean_env(lever.env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        if condition == "joined":
            if proc.stdout.readline().strip() != "warm":
                raise RuntimeError(f"{workload} worker failed before warming up:\n{proc.stderr.read()[-2000:]}")
            hog = start_hog(hog_size)
            time.sleep(JOIN_SETTLE_S)
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out, err = proc.communicate()
    finally:
        hog_rate = stop_hog(hog) if hog else None
    if proc.returncode:
        raise RuntimeError(f"{workload} worker failed:\n{err[-2000:]}")
    after = read_cpu_times()
    result = json.loads(out.strip().splitlines()[-1])
    if before and after:  # the worker's and the other job's time taken off, as vitkit.threads takes its own off
        after = dataclasses.replace(after, own=after.own + children_cpu_s() - children)
        result["others_cores"] = round(busy_elsewhere(before, after, len(os.sched_getaffinity(0))), 3)
    return {**result, "hog_matmuls_per_s": hog_rate}


def wait_for_quiet(limit_s: float = 600.0) -> None:
    """Until processes other than this one leave the cores idle (< QUIET_CORES over 2 s), at most `limit_s`."""
    from vitkit.threads import busy_elsewhere, read_cpu_times

    cores, deadline = len(os.sched_getaffinity(0)), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = read_cpu_times()
        time.sleep(2.0)
        after = read_cpu_times()
        if before is None or after is None or busy_elsewhere(before, after, cores) < QUIET_CORES:
            return


def measure_undisturbed(workload: str, lever: Lever, condition: str, args: argparse.Namespace) -> dict:
    """`measure`, again (after the machine is quiet) while a third process disturbed it, up to --retries times."""
    for attempt in range(args.retries + 1):
        result = measure(workload, lever, condition, args.quick, args.hog_size)
        if result.get("others_cores", 0.0) <= DISTURBED_CORES:
            break
        print(f"  {workload} / {condition}: other processes used {result['others_cores']:.2f} cores; "
              f"{'measuring again' if attempt < args.retries else 'kept, marked'}", file=sys.stderr)  # fmt: skip
        wait_for_quiet()
    return {**result, "attempts": attempt + 1}


def summarise(runs: list[dict]) -> dict:
    """Rounds of one measurement: the median of their medians, every round's, and the worst disturbance."""
    rates = [r["hog_matmuls_per_s"] for r in runs if r["hog_matmuls_per_s"] is not None]
    return {
        "median_s": statistics.median(r["median_s"] for r in runs),
        "rounds_s": [round(r["median_s"], 5) for r in runs],
        "threads_at_end": runs[-1]["threads_at_end"],
        "threads": runs[-1].get("threads", ""),
        "others_cores": max(r.get("others_cores", 0.0) for r in runs),
        "attempts": sum(r["attempts"] for r in runs),
        "hog_matmuls_per_s": statistics.median(rates) if rates else None,
    }


# ------------------------------------------------------------------------------------------------ report
def machine_info() -> dict:
    import torch

    parallel = torch.__config__.parallel_info()
    backend = next((line.split(":", 1)[1].strip() for line in parallel.splitlines() if "parallel backend" in line),
                   "unknown")  # fmt: skip
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "parallel_backend": backend, "load_before": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def add_ratios(rows: dict[str, dict[str, dict]]) -> None:
    """Slowdowns against default's time alone (against the lever's own time alone without default)."""
    for row in rows.values():
        base = rows.get("default", row).get("alone") or row.get("alone")
        if base is None:
            continue
        row["ratios"] = {cond: round(row[cond]["median_s"] / base["median_s"], 3) for cond in CONDITIONS if cond in row}


def print_table(results: dict[str, dict[str, dict]], conditions: list[str]) -> None:
    head = f"{'workload':8} {'lever':10}" + "".join(f" {c + ' ms':>10}" for c in conditions)
    head += "".join(f" {'x ' + c:>9}" for c in conditions) + f" {'threads':>9} {'others':>7}"
    print(head)
    for workload, rows in results.items():
        for lever, row in rows.items():
            ratios = row.get("ratios", {})
            line = f"{workload:8} {lever:10}" + "".join(f" {row[c]['median_s'] * 1e3:10.1f}" for c in conditions)
            line += "".join(f" {ratios.get(c, float('nan')):8.2f}x" for c in conditions)
            line += " " + "/".join(str(row[c]["threads_at_end"]) for c in conditions).rjust(9)
            print(line + f" {max(row[c]['others_cores'] for c in conditions):7.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", default="default,auto", help="comma list of: " + ",".join(LEVERS))
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of: " + ",".join(WORKLOADS))
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma list of: " + ",".join(CONDITIONS))
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per lever and condition (median taken)")
    p.add_argument("--retries", type=int, default=3, help="measure again, up to N times, when others disturbed it")
    p.add_argument("--quick", action="store_true", help="tiny models and a few calls: checks that the script runs")
    p.add_argument("--hog-size", type=int, default=1024, help="the other job's square matmul size")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    p.add_argument("--out", default=None, help="append this run to a JSON Lines file (benchmarks/results/)")
    p.add_argument("--worker", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--threads", default="", help=argparse.SUPPRESS)
    p.add_argument("--join", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hog", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.hog:
        return run_hog(args.hog_size)
    levers, workloads, conditions = args.levers.split(","), args.workloads.split(","), args.conditions.split(",")
    unknown = [x for x in levers if x not in LEVERS] + [x for x in workloads if x not in WORKLOADS]
    unknown += [x for x in conditions if x not in CONDITIONS]
    if unknown:
        p.error(f"unknown lever, workload or condition: {', '.join(unknown)}")
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, torch {info['torch']} "
          f"({info['parallel_backend']}); load average before: {info['load_before']}")  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    for workload in workloads:
        runs: dict[str, dict[str, list[dict]]] = {lever: {cond: [] for cond in conditions} for lever in levers}
        for _ in range(args.rounds):  # levers and conditions interleaved, so drift in the machine hits them alike
            for lever in levers:
                for cond in conditions:
                    runs[lever][cond].append(measure_undisturbed(workload, LEVERS[lever], cond, args))
        results[workload] = {lever: {c: summarise(r) for c, r in by_cond.items()} for lever, by_cond in runs.items()}
        add_ratios(results[workload])
    print_table(results, conditions)
    figures = {"machine": info, "quick": args.quick, "hog_size": args.hog_size,
               "levers": {name: vars(LEVERS[name]) for name in levers}, "results": results}  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    if args.out:
        append_record(args.out, "contention", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
