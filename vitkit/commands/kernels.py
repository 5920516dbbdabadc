"""`vitkit kernels build|status`: the optional C++ kernels (CPU attention on AMX, LayerNorm), built once per machine."""

from __future__ import annotations

import argparse
import time

HELP = "build or inspect vitkit's optional CPU kernels (attention on AVX-512 BF16 / AMX, LayerNorm)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build", "status"), help="build: compile once (~25 s); status: in use or why not")
    p.add_argument(
        "--if-supported",
        action="store_true",
        help="build: succeed quietly, with the reason, where the CPU or the toolchain cannot build it (make setup)",
    )
    p.add_argument("--verbose", action="store_true", help="build: show the compiler's output")


def run(args: argparse.Namespace) -> int:
    from vitkit.fast import kernels as cpu_kernels

    if args.action == "status":
        print(f"cpu kernels: {cpu_kernels.status()}")
        return 0
    if cpu_kernels.library_path().exists():
        print(f"cpu kernels: already built ({cpu_kernels.library_path()})")
        return 0
    reason = cpu_kernels.why_not_buildable()
    if reason:
        if args.if_supported:
            print(f"cpu kernels: not built ({reason}); the fast path uses PyTorch's ops")
            return 0
        raise OSError(f"cannot build the CPU kernels: {reason}")
    t = time.perf_counter()
    try:
        path = cpu_kernels.build(verbose=args.verbose)
    except Exception as e:  # a compiler error (other torch headers, an old gcc): SDPA stays, setup goes on
        last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
        if args.if_supported:
            print(f"cpu kernels: not built (the build failed: {last[0]}); the fast path uses PyTorch's ops")
            return 0
        raise OSError(f"building the CPU kernels failed: {last[0]} (details: --verbose)") from e
    print(f"cpu kernels: built {path} in {time.perf_counter() - t:.1f} s")
    return 0
