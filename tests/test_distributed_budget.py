"""`train --minutes` under DDP (2 CPU processes, gloo) when the ranks' clocks disagree: rank 0's clock decides.

Each rank times its own steps. If each rank also judged the budget by its own clock, one rank could stop a step
before the other (which then waits in its gradient all-reduce until the process group times out), and each rank
would lay the cosine schedule over the steps *it* measured (different learning rates: the weights drift apart in
silence). Here rank 1's clock runs 4x fast (its steps look 4x slower, its budget runs out at a quarter), so both
failures are certain without the agreement. The ranks run under a deadline; each reports its steps, the schedule
lay-outs it made and its final weights, which must all match rank 0's, bit for bit.
"""

import importlib
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vitkit.train import TrainConfig, fit
from vitkit.train import distributed as D
from vitkit.train.schedule import WarmupCosine

from .conftest import free_port, make_image_folder

WORLD = 2
RANK1_CLOCK_RATE = 4.0  # rank 1's perf_counter advances 4 s per real second
DEADLINE_S = 180  # generous: two processes importing torch and training a ~3 s budget need ~15 s


class _FastClock:
    """The `time` module with a perf_counter that runs `rate` times faster (from the moment it is made)."""

    def __init__(self, rate: float):
        self.rate, self.origin = rate, time.perf_counter()

    def perf_counter(self) -> float:
        return self.origin + (time.perf_counter() - self.origin) * self.rate

    def __getattr__(self, name):
        return getattr(time, name)


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(WORLD)
    env = D.init_distributed("cpu", timeout_s=60)  # fit() joins this group; a mismatched collective fails in 1 min
    try:
        assert D.from_main(float(rank), env) == 0.0  # every rank gets rank 0's value
        fit_mod = importlib.import_module("vitkit.train.fit")  # the module (vitkit.train.fit is also the function)
        loop_mod = importlib.import_module("vitkit.train.loop")

        if rank == 1:  # the budget clock and the step timings of rank 1 both read the fast clock
            fit_mod.time = loop_mod.time = _FastClock(RANK1_CLOCK_RATE)

        laid: list[tuple[int, int | None]] = []  # every schedule re-layout this rank made: (total_steps, at_step)
        relayout = WarmupCosine.relayout

        def spy_relayout(self, total_steps, at_step=None):
            laid.append((int(total_steps), at_step))
            relayout(self, total_steps, at_step)

        WarmupCosine.relayout = spy_relayout
        final: dict[str, torch.Tensor] = {}  # the weights of the last checkpoint (the finished run's)
        full_state = fit_mod.full_model_state_dict

        def spy_state(model, env):
            state = full_state(model, env)
            final.clear(), final.update(state)
            return state

        fit_mod.full_model_state_dict = spy_state
        cfg = TrainConfig(
            data=str(Path(tmp) / "images"),
            cache_dir=str(Path(tmp) / "cache"),
            val_split=0.0,
            out=str(Path(tmp) / "run"),
            model="vit_digits_patch2_8",
            model_kwargs=dict(img_size=(8, 8), in_chans=3, embed_dim=32, depth=2, num_heads=2),
            minutes=0.05,  # 3 s of rank 0's clock: hundreds of tiny steps, the schedule laid after the first 23
            batch_size=8,  # per rank
            lr=2e-3,
            warmup_epochs=0.5,
            progress=False,
            threads=1,
        )
        res = fit(cfg)
        torch.save({"steps": res.steps, "laid": laid, "weights": final}, f"{tmp}/{rank}.pt")
    finally:
        D.teardown(env)


def _spawn_with_deadline(tmp: str) -> None:
    ctx = mp.spawn(_worker, args=(free_port(), tmp), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank budget run did not finish in {DEADLINE_S} s: the ranks hang in a collective")


def test_budget_stop_and_schedule_follow_rank0_clock(tmp_path):
    make_image_folder(tmp_path / "images", ("c0", "c1", "c2", "c3"), per_class=64, size=8)  # 16 steps per epoch
    _spawn_with_deadline(str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD))

    assert r0["steps"] == r1["steps"]
    assert r0["laid"] and r0["laid"][0][1] == 23  # the budget did lay the schedule (3 warm-up + 20 timed steps) ...
    assert r0["laid"] == r1["laid"]  # ... over rank 0's count, on both ranks: the same learning rates
    assert r0["steps"] > 23
    assert r0["weights"].keys() == r1["weights"].keys() and r0["weights"]
    for k, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][k]), f"{k}: the ranks' weights diverged"
