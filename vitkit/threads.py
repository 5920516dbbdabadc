"""vitkit's CPU threads beside other jobs (`--threads auto`): every core, without spinning for a core held elsewhere.

Why: PyTorch's OpenMP runtime (GNU libgomp in the pip wheels) has a thread that finishes its share of a parallel
loop spin for up to 300,000 rounds before it sleeps, waiting for the rest of its team. Beside another process that
keeps the cores busy, a team mate is often descheduled for a whole time slice, and the others spin through their
own slices waiting for it: a bf16 training step ran 3.4-4.8x slower beside a 2-thread matmul loop, a batch-1
forward 2.6-7.8x, where a fair share of two cores is 2x (`benchmarks/contention.py`; docs/speed.md, "Beside other
jobs"). Quiet, the spinning is what makes a batch-1 forward fast: with passive waits (`OMP_WAIT_POLICY=PASSIVE`)
each of its hundreds of parallel loops pays a futex wake-up, 16-40 % slower. libgomp reads that policy once, when
torch loads it, so it cannot follow the load.

What follows the load: the load is read from /proc/stat (the cores this process may run on) minus this process's
own CPU time, about once a second, at the next forward (`adapt`, which `vitkit.fast.select` calls once per forward
on a CPU). While other processes keep a core busy, `SpinThrottle` shortens libgomp's waits to its 100-round
"oversubscribed" spin (the same as passive waits, measured), and forwards smaller than SMALL_FORWARD_ROWS run on
the free cores only; when the others stop, the waits spin again on every core. Where the waits cannot be
shortened (another OpenMP runtime, or OMP_WAIT_POLICY / GOMP_SPINCOUNT set by the user), every forward runs on the
free cores only: no team mate to wait for, but a smaller share of the machine (batch 32 2.7x).

The `vitkit` command turns this on for every verb (`--threads auto`, its default; `--threads N` fixes the count);
Python code opts in with `configure("auto")`. Where /proc/stat is missing (macOS, Windows), or torch's parallel
backend is not OpenMP, `auto` keeps torch's count.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

STARTING_THREADS = torch.get_num_threads()  # torch's own choice (OMP_NUM_THREADS, else the cores): auto's ceiling
AUTO = "auto"
ThreadSetting = int | Literal["auto"]
WINDOW_S = 1.0  # load measured over about this long: long enough for /proc/stat's 10 ms ticks, short to follow jobs
FIRST_WINDOW_S = 0.2  # the first reading, taken from configure() to the first forward (imports, model loading)
# Beside other processes' work, a forward of fewer token rows than this (ViT-S/16 @224: batch 1-5) runs on the free
# cores only. It is hundreds of short parallel loops: one thread does as well as two with short waits (batch 1, both
# cores busy elsewhere: 1.63x vs 1.74x in one run, a median of 34 ms for both over four processes, the worst 36 vs
# 65 ms) without depending on wake-ups. Large forwards keep every core: a training step of 8,192 rows 1.70x on both,
# 2.04x on the free one (benchmarks/contention.py; docs/speed.md, "Beside other jobs").
SMALL_FORWARD_ROWS = 1024


def parse_threads(value: str | int | None) -> ThreadSetting:
    """A thread setting from the command line, a recipe or Python: "auto" (or None) or a positive count."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return AUTO
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if isinstance(value, bool) or count < 1 or str(count) != str(value).strip():
        raise ValueError(f"threads must be a positive whole number or 'auto', got {value!r}")
    return count


def choose_threads(cores: int, busy_elsewhere: float) -> int:
    """Threads for the cores left free: `cores` usable, `busy_elsewhere` of them busy with other processes' work.

    A core counts as free when other processes leave more than half of it idle; never fewer than one thread.
    """
    return max(1, min(cores, math.floor(cores - busy_elsewhere + 0.5)))


# ------------------------------------------------------------------------------------------------ the load
@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds since boot: `busy` and `total` over the cores read, `own` of this process."""

    busy: float
    total: float
    own: float


def read_cpu_times(cpus: Collection[int] | None = None, stat: Path = Path("/proc/stat")) -> CpuTimes | None:
    """The CPU times of the cores in `cpus` (default: those this process may run on), None where unreadable."""
    cpus = set(os.sched_getaffinity(0)) if cpus is None and hasattr(os, "sched_getaffinity") else cpus
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = total = 0
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        fields = rest.split()
        # user nice system idle iowait irq softirq steal (guest time is already counted in user)
        ticks = [int(v) for v in fields[:8]]
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]  # steal counts as busy: the hypervisor gave the core away
    if not total:
        return None
    own = os.times()
    return CpuTimes(busy / tick, total / tick, own.user + own.system)


def busy_elsewhere(before: CpuTimes, after: CpuTimes, cores: int) -> float:
    """How many of `cores` other processes kept busy between two readings (this process's own time taken off)."""
    wall = (after.total - before.total) / cores
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall


# ------------------------------------------------------------------------------------------------ spinning
class SpinThrottle:
    """Stops libgomp's long spin-waits while other processes hold cores, by parking one idle OpenMP team.

    libgomp spins 300,000 rounds before it sleeps, but only 100 "if there are more OpenMP threads than available
    CPUs" (GCC's manual, GOMP_SPINCOUNT) - it counts its own threads, not other processes'. `park()` runs one
    parallel loop on a helper thread that then waits: the team it leaves behind sleeps (no CPU), and its threads
    make libgomp count more threads than CPUs, so every wait in the process turns short. `unpark()` ends the
    helper; libgomp frees its team and spins again. Measured in `benchmarks/contention.py` (lever `auto` against
    `passive`): the same as OMP_WAIT_POLICY=PASSIVE beside a busy job, and undone when the job ends, which the policy
    cannot be. `team`: the helper's thread count (every core: its team must outnumber the CPUs with the main one's).
    """

    def __init__(self, team: int) -> None:
        self.team = team
        self._stop: threading.Event | None = None
        self._helper: threading.Thread | None = None

    @property
    def parked(self) -> bool:
        return self._helper is not None

    def set(self, parked: bool) -> None:
        if parked and self._helper is None:
            self.park()
        elif not parked and self._helper is not None:
            self.unpark()

    def park(self) -> None:
        ready, self._stop = threading.Event(), threading.Event()

        def hold_a_team(stop: threading.Event) -> None:
            torch.set_num_threads(self.team)  # this thread's own count: whatever the last forward set elsewhere
            torch.empty(1 << 20).fill_(1.0)  # above ATen's grain size: one parallel loop, a team for this thread
            ready.set()
            stop.wait()

        self._helper = threading.Thread(
            target=hold_a_team, args=(self._stop,), name="vitkit-spin-throttle", daemon=True
        )
        self._helper.start()
        ready.wait()

    def unpark(self) -> None:
        assert self._stop is not None and self._helper is not None
        self._stop.set()
        self._helper.join()
        self._stop = self._helper = None

    @staticmethod
    def works_here() -> bool:
        """libgomp is torch's OpenMP runtime, and no one chose its wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT)."""
        if os.environ.get("VITKIT_SPIN_THROTTLE", "1") == "0":
            return False
        if any(os.environ.get(name) for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
            return False
        try:
            return "libgomp" in Path("/proc/self/maps").read_text()
        except OSError:
            return False


# ------------------------------------------------------------------------------------------------ the choice
class LoadAdaptiveThreads:
    """Follows the load, re-measured once a window has passed. Quiet: every core, waits that spin. Beside other
    processes' work: every core with short waits (`SpinThrottle`), but small forwards on the free cores only; where
    the waits cannot be shortened, every forward on the free cores only.

    OpenMP keeps the count per thread, so each thread that runs a forward (the main one, a server's worker)
    applies the count to itself in `adapt()`.
    """

    def __init__(
        self,
        cores: int,
        throttle: SpinThrottle | None = None,
        read: Callable[[], CpuTimes | None] = read_cpu_times,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        get_threads: Callable[[], int] = torch.get_num_threads,
        window: float = WINDOW_S,
        first_window: float = FIRST_WINDOW_S,
    ):
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        self.cores, self.throttle, self.read, self.clock = cores, throttle, read, clock
        self.set_threads, self.get_threads = set_threads, get_threads
        self.window = window
        self.free = cores  # the cores other processes leave free, as last measured
        self.lock = threading.Lock()
        self.last, self.since = read(), clock() - (window - first_window)

    def adapt(self, rows: int | None = None) -> int:
        """The thread count for a forward of `rows` token rows (None: unknown, taken as large), set on the calling
        thread; the load is re-measured first when a window has passed."""
        if self.clock() - self.since >= self.window:
            with self.lock:
                if self.clock() - self.since >= self.window:  # not already re-measured by another thread
                    self._measure()
        threads = self.threads_for(rows)
        if self.get_threads() != threads:
            self.set_threads(threads)
        return threads

    def threads_for(self, rows: int | None) -> int:
        if self.free >= self.cores:
            return self.cores
        small = rows is not None and rows < SMALL_FORWARD_ROWS
        return self.free if small or self.throttle is None else self.cores

    def _measure(self) -> None:
        now = self.read()
        if now is not None and self.last is not None:
            self.free = choose_threads(self.cores, busy_elsewhere(self.last, now, self.cores))
            if self.throttle is not None:
                self.throttle.set(self.free < self.cores)
        self.last, self.since = now, self.clock()

    def close(self) -> None:
        """Stop following the load: waits spin again."""
        if self.throttle is not None:
            self.throttle.set(False)


_active: LoadAdaptiveThreads | None = None


def following_load() -> bool:
    """Whether `configure("auto")` is in force here (a caller may skip working out `adapt`'s argument otherwise)."""
    return _active is not None


def adapt(rows: int | None = None) -> None:
    """Apply the load-adapted count for a forward of `rows` token rows to the calling thread; nothing unless
    `configure("auto")` turned it on."""
    if _active is not None:
        _active.adapt(rows)


def can_follow_load() -> bool:
    """Whether torch's thread count may change between calls here: the OpenMP backend, and a /proc/stat."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info() and read_cpu_times() is not None


def configure(setting: str | int | None, cores: int = STARTING_THREADS) -> str:
    """Set vitkit's thread count for this process: a number, or "auto" (follow the load); returns what was done.

    cores: the most threads `auto` uses (default: the count torch started with, which honours OMP_NUM_THREADS).
    """
    global _active
    choice = parse_threads(setting)
    if _active is not None:
        _active.close()
    _active = None
    if choice != AUTO:
        torch.set_num_threads(choice)
        return f"{choice} threads"
    torch.set_num_threads(cores)
    if not can_follow_load():
        return f"{cores} threads (auto: the load cannot be read here)"
    if cores > 1 and SpinThrottle.works_here():
        _active = LoadAdaptiveThreads(cores, SpinThrottle(cores))
        return f"auto: {cores} threads, short OpenMP waits while other processes hold cores"
    _active = LoadAdaptiveThreads(cores)
    return f"auto: up to {cores} threads, one per core that other processes leave free"


@contextlib.contextmanager
def configured(setting: str | int | None) -> Iterator[str]:
    """`configure(setting)` for the duration of a `with` block; then the setting and count from before it."""
    global _active
    before, count = _active, torch.get_num_threads()
    _active = None  # configure() must not close the one from before: it comes back
    try:
        yield configure(setting)
    finally:
        if _active is not None:
            _active.close()
        _active = before
        torch.set_num_threads(count)
