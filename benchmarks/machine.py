"""What every benchmark shares: the machine it ran on, where the data lives, where a run's record goes.

Imported by the scripts beside this file (they run as `python benchmarks/<name>.py`, so this folder is on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The CIFAR-10 train archive: `$VITKIT_CIFAR10`, else the shared datasets folder beside the repository. The default
# is written relative to the current directory so that no machine's absolute layout is baked into the scripts.
DEFAULT_CIFAR10 = os.environ.get("VITKIT_CIFAR10") or os.path.relpath(
    REPO.parent / "shared" / "datasets" / "cifar10-train.tar.gz"
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    """The repository's HEAD commit, with "-dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def append_record(path: str | Path, benchmark: str, figures: dict) -> Path:
    """Append one run of a benchmark to a JSON Lines file: when, which commit, which command, and its figures.

    The results history lives in these files (benchmarks/results/), not in prose, so that a figure can always be
    traced to the run, commit and machine that produced it. `figures` should carry the machine and versions as the
    benchmark prints them.

    Args:
        path: the .jsonl file; created with its folder if missing.
        benchmark: the script's name, e.g. "throughput".
        figures: everything the run measured, JSON-serialisable.

    Returns:
        The path written to.
    """
    record = {
        "benchmark": benchmark,
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        **figures,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return path
