"""Seeing a run: a tqdm bar (loss, img/s, lr; tqdm gives the ETA), metrics as JSON lines, TensorBoard if present.

Only rank 0 logs; other ranks get a logger whose methods do nothing. Each JSONL record is one event:
{"kind": "train" | "val" | "info", "step": ..., "epoch": ..., "time": seconds since the start, ...metrics}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Progress bar + `metrics.jsonl` (+ TensorBoard events under `tb/` when tensorboard is installed)."""

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        show_bar: bool = True,
    ):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.t0 = time.perf_counter()
        self.bar = None
        self.tb = None
        self._file = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if show_bar:
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0
            )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:  # tensorboard is optional (the dev extra installs it)
                self.tb = None

    def set_total(self, total_steps: int) -> None:
        """The step count changed (a --minutes budget re-estimated it): the bar's ETA follows."""
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def step(self, n: int = 1, **shown: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False
            )
            self.bar.update(n)

    def log(self, kind: str, step: int, **metrics: Any) -> None:
        """Append one record to metrics.jsonl and the numeric values to TensorBoard as `kind/name`."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.perf_counter() - self.t0, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def print(self, msg: str) -> None:
        """A message that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self._file is not None:
            self._file.close()
        self.bar = self.tb = self._file = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (a torn last line, from a crash mid-write, is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found; pass a run folder written by `vitkit train`")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
