"""Training and inference throughput of vitkit vs timm, Hugging Face transformers and torchvision, side by side.

Same architecture in every library, models interleaved in one process (the order rotates every repetition so
drift in machine load hits all of them alike), median of >= 5 timed repetitions after warm-up. Batch-1 latency
calls each library 5 times back to back per repetition (`--latency-burst`): the latency of a warm model, as a
server answering a stream of requests sees it, and as timm's own benchmark measures it.

    .venv/bin/python benchmarks/throughput.py            # full table, ~10 min (B/16: bf16 only)
    .venv/bin/python benchmarks/throughput.py --quick    # ViT-Ti/4 + S/16, < 2 min
    ... --json                                           # also one JSON line with every ratio (vitkit / fastest peer)
    ... --out benchmarks/results/throughput.jsonl        # append this run (commit, machine, figures) to the history
    ... --only ti4_32 --modes train --precisions bf16 --libs vitkit,timm              # a slice
    ... --only int8                                      # only the int8 rows (ViT-S/16 batch 32 and 1), ~3 min

Each library is called the ordinary way: `create_model`-style constructor, `torch.autocast("cpu", bf16)` for bf16,
`torch.optim.AdamW` for training, `torch.inference_mode()` for inference. Hugging Face runs with its `sdpa`
attention unless `eager` is faster (both are timed during warm-up and the faster one is reported).
TFLOP/s counts matrix-multiply FLOPs analytically (patch embedding, qkv, attention, proj, MLP, head; training =
3 x forward). Peak = a large square matmul timed in the same run.

int8 rows (ViT-S/16 @224 inference, batch 32 and batch-1 latency; `--only int8` runs these alone, `--no-int8` skips
them): vitkit's int8 model (vitkit.quant: static activations calibrated on random images, which sets the speed as
real images would, and dynamic), vitkit bf16, timm bf16, and ONNX Runtime's own int8 quantization
(`onnxruntime.quantization.quantize_dynamic`, per-channel int8 weights) of the same model exported by vitkit, with
as many threads as torch: interleaved with idle threads blocking, and once more alone with ORT's default spinning
threads. Random weights: these rows time, `vitkit evaluate --precision int8` scores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from machine import DEFAULT_CIFAR10, append_record, cpu_model  # benchmarks/machine.py (this folder is on sys.path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@dataclass(frozen=True)
class Arch:
    key: str
    title: str
    img: int
    patch: int
    dim: int
    depth: int
    heads: int
    classes: int
    batch: int

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2 + 1

    def matmul_flops(self) -> float:
        """Forward matmul FLOPs per image (2 x multiply-adds)."""
        N, D, P = self.tokens, self.dim, (self.img // self.patch) ** 2
        per_block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * 4 * D
        return self.depth * per_block + 2 * P * 3 * self.patch**2 * D + 2 * D * self.classes


ARCHS = {
    "ti4_32": Arch("ti4_32", "ViT-Ti/4 @32", 32, 4, 192, 12, 3, 10, 128),
    "s16_224": Arch("s16_224", "ViT-S/16 @224", 224, 16, 384, 12, 6, 1000, 32),
    "b16_224": Arch("b16_224", "ViT-B/16 @224", 224, 16, 768, 12, 12, 1000, 16),
}


# ------------------------------------------------------------------------------------------- model builders
def build_vitkit(a: Arch) -> torch.nn.Module:
    import vitkit

    return vitkit.create_model(
        "vit_base_patch16_224", img_size=a.img, patch_size=a.patch, embed_dim=a.dim, depth=a.depth,
        num_heads=a.heads, num_classes=a.classes,
    )  # fmt: skip


def build_timm(a: Arch) -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_base_patch16_224", img_size=a.img, patch_size=a.patch, embed_dim=a.dim, depth=a.depth,
        num_heads=a.heads, num_classes=a.classes,
    )  # fmt: skip


def build_hf(a: Arch, attn: str) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=a.dim, num_hidden_layers=a.depth, num_attention_heads=a.heads, intermediate_size=4 * a.dim,
        image_size=a.img, patch_size=a.patch, num_labels=a.classes, layer_norm_eps=1e-6,
    )  # fmt: skip
    cfg._attn_implementation = attn
    model = ViTForImageClassification(cfg)

    class Logits(torch.nn.Module):  # HF returns an output object; the other libraries return logits
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    return Logits(model)


def build_torchvision(a: Arch) -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=a.img, patch_size=a.patch, num_layers=a.depth, num_heads=a.heads, hidden_dim=a.dim,
        mlp_dim=4 * a.dim, num_classes=a.classes,
    )  # fmt: skip


LIBS = ("vitkit", "timm", "hf", "torchvision")


def build(lib: str, a: Arch, hf_attn: str = "sdpa") -> torch.nn.Module:
    if lib == "vitkit":
        return build_vitkit(a)
    if lib == "timm":
        return build_timm(a)
    if lib == "hf":
        return build_hf(a, hf_attn)
    return build_torchvision(a)


# ----------------------------------------------------------------------------------------------- workloads
def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def train_step_fn(model: torch.nn.Module, a: Arch, precision: str) -> Callable[[], None]:
    """One optimisation step: forward, cross-entropy, backward, AdamW."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(a.batch, 3, a.img, a.img)
    y = torch.randint(0, a.classes, (a.batch,))

    def step() -> None:
        with autocast(precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model: torch.nn.Module, a: Arch, precision: str, batch: int) -> Callable[[], None]:
    model.eval()
    x = torch.randn(batch, 3, a.img, a.img)

    def run() -> None:
        with torch.inference_mode(), autocast(precision):
            model(x)

    return run


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_fn(lib: str, a: Arch, mode: str, precision: str, hf_attn: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build(lib, a, hf_attn)
    if mode == "train":
        return train_step_fn(model, a, precision)
    return infer_fn(model, a, precision, a.batch if mode == "infer" else 1)


def pick_hf_attention(a: Arch, mode: str, precision: str) -> str:
    """Hugging Face's faster attention implementation for this workload (sdpa unless eager wins)."""
    times = {}
    for impl in ("sdpa", "eager"):
        fn = make_fn("hf", a, mode, precision, impl)
        fn()
        times[impl] = timed(fn)
    return min(times, key=times.get)


def run_case(a: Arch, mode: str, precision: str, libs: list[str], reps: int, warmup: int, burst: int = 1) -> dict:
    """Time every library on one workload, interleaved; returns {lib: median seconds} plus the HF choice.

    Each repetition calls every library `burst` times back to back (timing each call), then moves to the next;
    the order rotates between repetitions. burst=1: every call follows another library's (cold caches).
    """
    hf_attn = pick_hf_attention(a, mode, precision) if "hf" in libs else "sdpa"
    fns = {lib: make_fn(lib, a, mode, precision, hf_attn) for lib in libs}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {lib: [] for lib in libs}
    order = list(libs)
    for _ in range(reps):
        for lib in order:
            samples[lib].extend(timed(fns[lib]) for _ in range(burst))
        order = order[1:] + order[:1]  # rotate so no library always runs first after another's cache pollution
    return {"median_s": {lib: statistics.median(v) for lib, v in samples.items()}, "hf_attn": hf_attn}


# ------------------------------------------------------------------------------------------------ machine
def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """TFLOP/s of an n x n x n matmul in this dtype on this machine, now."""
    x = torch.randn(n, n).to(dtype)
    y = torch.randn(n, n).to(dtype)
    for _ in range(2):
        x @ y
    best = min(timed(lambda: x @ y) for _ in range(reps))
    return 2 * n**3 / best / 1e12


def machine_info() -> dict:
    cpu = cpu_model()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("timm", "transformers", "torchvision"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    from vitkit.fast import kernels as cpu_kernels

    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "versions": versions, "load": load,
        "cpu_kernels": cpu_kernels.status(),  # vitkit's CPU kernels: in use, or why not (PyTorch's ops then)
    }  # fmt: skip


def fix_malloc() -> str:
    """glibc only: fixed mmap / trim thresholds for every library in the process alike (`vitkit.allocator`).

    By default glibc serves big blocks with fresh mmap()s that the kernel zero-fills page by page on first touch,
    and where its threshold sits depends on the process's history, so one library's allocations can slow the next
    one's (benchmarks/README.md, "Allocator"). `--malloc fixed` sets what the `vitkit` command sets for itself; the
    default leaves glibc as it is (each library called the ordinary way).
    """
    from vitkit import allocator

    return allocator.configure()


# ------------------------------------------------------------------------------------------------ end-to-end
def vitkit_train_throughput(steps: int, data: str = DEFAULT_CIFAR10) -> dict:
    """img/s of `vitkit train` (vitkit.train.fit with the cifar10_budget recipe) for a fixed number of steps.

    The decode cache is built on first use (reported apart by fit as data seconds); img/s counts training time.
    """
    import tempfile

    try:
        from vitkit.train.fit import fit
        from vitkit.train.recipe import build_config
    except ImportError as e:
        return {"skipped": f"vitkit.train is not available ({e})"}
    if not os.path.exists(data):
        return {"skipped": f"{data} not found"}
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(
            "cifar10_budget", data=data, out=out, stop_after_steps=steps, epochs=1, progress=False, val_split=0.02
        )
        res = fit(cfg)
    return {
        "recipe": "cifar10_budget", "steps": res.steps, "batch": cfg.batch_size,
        "img_per_s": round(res.images_per_second, 1), "train_s": round(res.train_seconds, 1),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ int8
INT8_ARCH = "s16_224"
# (workload, compared with, bound, description): the int8 targets (docs/speed.md, "int8")
INT8_TARGETS = (
    ("infer/b32", "vitkit bf16", 1.5, "int8 ViT-S/16 batch 32 >= 1.5x vitkit bf16"),
    ("infer/b32", "timm bf16", 2.5, "int8 ViT-S/16 batch 32 >= 2.5x timm bf16"),
    ("latency/b1", None, 9.0, "int8 ViT-S/16 batch 1 <= 9 ms"),
)


def onnxruntime_int8(model: torch.nn.Module, folder: str) -> dict[str, Callable[[torch.Tensor], object]] | str:
    """ONNX Runtime's own dynamic int8 quantization of `model` (vitkit's fp32 ONNX export, any batch), as callables
    on (B, C, H, W) float32: {"quiet": idle threads block (the interleaved row), "spinning": ORT's default, idle
    threads spin}; or the reason it cannot run."""
    try:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from vitkit.infer.export import INPUT_NAME, export_onnx
    except ImportError as e:
        return f"skipped: {e}"
    fp32 = os.path.join(folder, "model.onnx")
    int8 = os.path.join(folder, "model.int8.onnx")
    export_onnx(model, fp32, dynamic=True, check=False)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    runs = {}
    for kind in ("quiet", "spinning"):
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # the same cores as torch
        if kind == "quiet":  # spinning idle threads would take the cores from the next library in the interleaved order
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(int8, opts, providers=["CPUExecutionProvider"])
        runs[kind] = lambda x, session=session: session.run(None, {INPUT_NAME: x.numpy()})
    return runs


def int8_fns(a: Arch, batch: int, ort: dict | str) -> dict[str, Callable[[], None]]:
    """The int8 rows' contenders at one batch size, each a no-argument call on the same random images."""
    from vitkit.quant import layers as int8_layers
    from vitkit.quant import observe_ranges, quantize_model

    torch.manual_seed(0)
    model = build_vitkit(a).eval()
    x = torch.randn(batch, 3, a.img, a.img)
    static = quantize_model(model, observe_ranges(model, [torch.randn(8, 3, a.img, a.img)]))
    dynamic = quantize_model(model)

    def under_bf16(m: torch.nn.Module, sdpa: bool = False) -> Callable[[], None]:
        def run() -> None:
            explicit = int8_layers.EXPLICIT_ATTENTION
            int8_layers.EXPLICIT_ATTENTION = explicit and not sdpa  # what the int8 plan's attention choice gives
            try:
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
                    m(x)
            finally:
                int8_layers.EXPLICIT_ATTENTION = explicit

        return run

    fns = {"vitkit int8": under_bf16(static), "vitkit int8 dynamic": under_bf16(dynamic)}
    if int8_layers.EXPLICIT_ATTENTION:  # a CPU without AMX: also the int8 plan with SDPA, as the bf16 path runs it
        fns["vitkit int8, SDPA attention"] = under_bf16(static, sdpa=True)
    fns |= {"vitkit bf16": under_bf16(model), "timm bf16": infer_fn(build_timm(a), a, "bf16", batch)}
    if isinstance(ort, dict):
        fns["onnxruntime int8"] = lambda: ort["quiet"](x)
    return fns


def spinning_onnxruntime(a: Arch, batch: int, ort: dict, reps: int, burst: int) -> float:
    """ORT with its default spinning threads, timed on its own after the interleaved set (whatever ran after it
    there would pay for the spinning): median seconds per call."""
    x = torch.randn(batch, 3, a.img, a.img)
    return time_interleaved({"spinning": lambda: ort["spinning"](x)}, reps, WARMUP, burst)["spinning"]


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int, burst: int) -> dict[str, float]:
    """Median seconds per call of each function: interleaved, `burst` calls back to back, the order rotating."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(reps):
        for name in order:
            samples[name].extend(timed(fns[name]) for _ in range(burst))
        order = order[1:] + order[:1]
    return {name: statistics.median(v) for name, v in samples.items()}


def run_int8(reps: int, burst: int, arch: str = INT8_ARCH) -> tuple[list[dict], list[dict]]:
    """The int8 rows: inference at the arch's batch (ViT-S/16: 32) and batch-1 latency; (rows, target verdicts)."""
    import tempfile

    a = ARCHS[arch]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        ort = onnxruntime_int8(build_vitkit(a).eval(), folder)
        if not isinstance(ort, dict):
            print(f"onnxruntime int8: {ort}")
        rows = []
        for mode, batch in (("infer", a.batch), ("latency", 1)):
            calls = burst if mode == "latency" else 1
            med = time_interleaved(int8_fns(a, batch, ort), reps, WARMUP, calls)
            if isinstance(ort, dict):
                med["onnxruntime int8 spinning (alone)"] = spinning_onnxruntime(a, batch, ort, reps, calls)
            int8 = med["vitkit int8"]
            label = f"{a.title} int8 {mode} b{batch}"
            for name, sec in sorted(med.items(), key=lambda kv: kv[1]):
                print(f"{label:<30}{name:<34}{batch / sec:>9.1f}{sec * 1e3:>9.1f}{sec / int8:>10.2f}x")
                label = ""
            print()
            rows.append(
                {"arch": arch, "mode": mode, "batch": batch, "ms": {k: round(v * 1e3, 2) for k, v in med.items()},
                 "int8_speedup": {k: round(v / int8, 3) for k, v in med.items() if k != "vitkit int8"}}
            )  # fmt: skip
    return rows, int8_verdicts(rows)


def int8_verdicts(rows: list[dict]) -> list[dict]:
    """Each int8 target whose row ran: what was reached and whether it is met."""
    by_key = {f"{r['mode']}/b{r['batch']}": r for r in rows if r["arch"] == INT8_ARCH}  # the targets are ViT-S/16's
    verdicts = []
    for key, peer, bound, text in INT8_TARGETS:
        r = by_key.get(key)
        if r is None or (peer is not None and peer not in r["int8_speedup"]):
            continue
        reached = r["ms"]["vitkit int8"] if peer is None else r["int8_speedup"][peer]
        met = reached <= bound if peer is None else reached >= bound
        verdicts.append({"target": text, "workload": f"{INT8_ARCH}/{key}/int8", "reached": reached, "met": met})
    return verdicts


# ------------------------------------------------------------------------------------------------ main
WARMUP = 2  # calls per library before timing: with one, B/16's first timed step still paid for its first big blocks

# the project's CPU speed targets (docs/speed.md):
# (workload key as in the JSON ratios, what is compared, bound, description)
TARGETS = (
    ("ti4_32/train/b128/bf16", "ratio", 4.0, "training ViT-Ti/4 @32, vitkit / fastest peer >= 4x"),
    ("s16_224/train/b32/bf16", "ratio", 2.0, "training ViT-S/16 @224, vitkit / fastest peer >= 2x"),
    ("s16_224/infer/b32/bf16", "ratio", 1.6, "inference ViT-S/16 @224 batch 32, vitkit / fastest peer >= 1.6x"),
    ("s16_224/latency/b1/bf16", "ms", 15.0, "inference ViT-S/16 @224 batch 1, vitkit <= 15 ms"),
)


def workload_key(e: dict) -> str:
    """A result's name in the JSON ratios and in TARGETS: arch/mode/b<batch>/precision."""
    return f"{e['arch']}/{e['mode']}/b{e['batch']}/{e['precision']}"


def target_verdicts(results: list[dict]) -> list[dict]:
    """Each target whose workload ran: what was reached, whether it is met, and against which peers.

    The targets are set against all three peers; a run with fewer (`--libs`) says so, because the peers also shape
    each other's times (glibc's malloc threshold moves with what ran before: benchmarks/README.md).
    """
    by_key = {workload_key(e): e for e in results}
    verdicts = []
    for key, what, bound, text in TARGETS:
        e = by_key.get(key)
        if e is None or "vitkit" not in e["ms"] or (what == "ratio" and "ratio" not in e):
            continue
        reached = e["ratio"] if what == "ratio" else e["ms"]["vitkit"]
        met = reached >= bound if what == "ratio" else reached <= bound
        peers = sorted(lib for lib in e["ms"] if lib != "vitkit")
        verdicts.append(
            {
                "target": text,
                "workload": key,
                "compares": what,
                "reached": reached,
                "bound": bound,
                "met": met,
                "peers": peers,
            }
        )
    return verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="also print one JSON line with all results and ratios")
    p.add_argument("--quick", action="store_true", help="ViT-Ti/4 and ViT-S/16 bf16 only, fewer repetitions")
    p.add_argument(
        "--only", default=None, help="comma list of archs: " + ",".join(ARCHS) + "; or int8: only those rows"
    )
    p.add_argument("--no-int8", action="store_true", help="skip the int8 rows (ViT-S/16 inference, vitkit.quant)")
    p.add_argument("--int8-arch", default=INT8_ARCH, choices=list(ARCHS), help="the int8 rows' model (tests: smaller)")
    p.add_argument("--modes", default="train,infer,latency")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--latency-burst",
        type=int,
        default=5,
        help="batch-1 latency: calls per library back to back in each repetition (a warm model, as a server sees a "
        "stream of requests); 1 = one call per library per repetition, each after another library's (cold caches)",
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end `vitkit train` measurement")
    p.add_argument("--data", default=DEFAULT_CIFAR10, help="CIFAR-10 train archive for the end-to-end measurement")
    p.add_argument(
        "--out", help="append this run (commit, machine, versions, every figure) as one line to this .jsonl file"
    )
    p.add_argument(
        "--malloc", choices=("default", "fixed"), default="default", help="glibc malloc as is, or fix_malloc()"
    )
    args = p.parse_args(argv)
    malloc = fix_malloc() if args.malloc == "fixed" else "default"

    only_int8 = args.only == "int8"
    archs = [] if only_int8 else args.only.split(",") if args.only else list(ARCHS)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"unknown arch(s) {unknown} in --only; choose from {', '.join(ARCHS)} or int8")
    precisions = args.precisions.split(",")
    if args.quick and not args.only:
        archs = ["ti4_32", "s16_224"]
    if args.quick and args.precisions == "bf16,fp32":
        precisions = ["bf16"]
    modes = args.modes.split(",")
    libs = args.libs.split(",")
    reps = max(args.reps, 5)

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch threads {info['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"load before: {info['load']}; malloc: {malloc}")
    print(f"vitkit CPU kernels: {info['cpu_kernels']}")
    peak = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"matmul peak (2048^3): bf16 {peak['bf16']:.2f} TFLOP/s, fp32 {peak['fp32']:.2f} TFLOP/s\n")

    results = []
    hdr = f"{'workload':<34}{'library':<13}{'img/s':>9}{'ms/it':>9}{'TFLOP/s':>9}{'%peak':>7}{'vs best peer':>14}"
    print(hdr)
    print("-" * len(hdr))
    for key in archs:
        a = ARCHS[key]
        for mode in modes:
            for prec in precisions:
                if key == "b16_224" and prec == "fp32" and not args.only:
                    continue  # ~4 min on 2 cores; run it with --only b16_224 --precisions fp32
                burst = max(args.latency_burst, 1) if mode == "latency" else 1
                r = run_case(a, mode, prec, libs, reps, WARMUP, burst)
                batch = 1 if mode == "latency" else a.batch
                flops = a.matmul_flops() * batch * (3 if mode == "train" else 1)
                med = r["median_s"]
                peers = {k: v for k, v in med.items() if k != "vitkit"}
                best_peer = min(peers, key=peers.get) if peers else None
                label = f"{a.title} {mode} b{batch} {prec}"
                for lib, s in sorted(med.items(), key=lambda kv: kv[1]):
                    name = f"hf({r['hf_attn']})" if lib == "hf" else lib
                    ratio = peers[best_peer] / s if best_peer else float("nan")
                    tf = flops / s / 1e12
                    print(
                        f"{label:<34}{name:<13}{batch / s:>9.1f}{s * 1e3:>9.1f}{tf:>9.3f}"
                        f"{100 * tf / peak[prec]:>6.0f}%{ratio:>13.2f}x"
                    )
                    label = ""
                entry = {"arch": key, "mode": mode, "precision": prec, "batch": batch, "hf_attn": r["hf_attn"]}
                entry["ms"] = {k: round(v * 1e3, 2) for k, v in med.items()}
                if best_peer and "vitkit" in med:
                    entry["best_peer"] = best_peer
                    entry["ratio"] = round(peers[best_peer] / med["vitkit"], 3)
                results.append(entry)
                print()

    int8_rows, int8_targets = [], []
    if only_int8 or not (args.no_int8 or args.only or args.quick):
        print(f"{'int8 workload':<30}{'library':<34}{'img/s':>9}{'ms/it':>9}{'int8 faster':>12}")
        print("-" * 94)
        int8_rows, int8_targets = run_int8(reps, max(args.latency_burst, 1), args.int8_arch)

    verdicts = target_verdicts(results)
    if verdicts:
        print("targets (docs/speed.md):")
        for v in verdicts:
            unit = "x" if v["compares"] == "ratio" else " ms"
            partial = "" if len(v["peers"]) == len(LIBS) - 1 else f" (peers in this run: {', '.join(v['peers'])})"
            print(f"  {'MET    ' if v['met'] else 'NOT MET'}  {v['target']}: reached {v['reached']:.2f}{unit}{partial}")
        print()
    if int8_targets:
        print("int8 targets (docs/speed.md):")
        for v in int8_targets:
            unit = " ms" if v["workload"].endswith("b1/int8") else "x"
            print(f"  {'MET    ' if v['met'] else 'NOT MET'}  {v['target']}: reached {v['reached']:.2f}{unit}")
        print()

    e2e = (
        None if (args.no_e2e or only_int8) else vitkit_train_throughput(steps=10 if args.quick else 30, data=args.data)
    )
    if e2e is not None:
        print(f"end-to-end `vitkit train` (cifar10_budget recipe, CIFAR-10 train tar): {e2e}")
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load after: {load_after}")
    ratios = {workload_key(e): e.get("ratio") for e in results}
    out = {"machine": info, "malloc": malloc, "load_after": load_after, "peak_tflops": peak, "ratios": ratios}
    out.update(targets=verdicts, results=results, e2e=e2e, int8=int8_rows, int8_targets=int8_targets)
    if args.json:
        print(json.dumps(out))
    if args.out:
        print(f"appended to {append_record(args.out, 'throughput', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
