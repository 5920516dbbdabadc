"""glibc malloc tuned for big, short-lived activations: no fresh zero-filled pages on every forward.

By default glibc serves a block above its mmap threshold with a fresh `mmap()`, and the kernel zero-fills each
page on first touch. The threshold starts at 128 KiB and rises to the largest block freed so far (at most 32 MiB),
and the heap is trimmed back to the OS whenever its free top passes twice that. A ViT forward allocates and frees
tens of MiB per layer (ViT-S/16 batch 32: the MLP's hidden activation alone is 19 MiB), and where the threshold
sits depends on what the process allocated before: a process that ran small batches first (as a server does)
page-faults every large activation back in on each forward. Fixing the thresholds removes those faults: `vitkit
train` about +5 % img/s, a batch-32 forward after batch-1 traffic about 10 % faster (benchmarks/README.md, "What
each lever gave"; the end-to-end row of `benchmarks/throughput.py --malloc fixed` against `--malloc default`).

`configure()` fixes the mmap threshold at its maximum (32 MiB: bigger blocks are still mmapped) and lets the heap
keep up to 128 MiB of free space before trimming, which bounds the memory held back. The `vitkit` command calls it
for every verb; Python users can call it themselves. It changes the whole process's allocator, so the library
never calls it on import. `VITKIT_MALLOC=default` turns it off. Not glibc (macOS, musl): nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 128 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from <malloc.h>


def configure() -> str:
    """Fix glibc's mmap and trim thresholds for this process; returns what was done, in words."""
    if os.environ.get("VITKIT_MALLOC", "").lower() == "default":
        return "default (VITKIT_MALLOC=default)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        )
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "default (mallopt unavailable)"
    return f"fixed (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB)"
