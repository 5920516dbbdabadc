"""A NaN loss on ONE rank under DDP (2 CPU processes, gloo): every rank skips that step together.

Without the agreement (a MIN all-reduce of the "loss is finite" flag), the rank that saw the NaN skips backward
while the other runs it: their gradient all-reduces then pair up with different steps (weights drift apart in
silence) or wait for each other forever. So the test runs the ranks under a deadline and compares, per rank, the
steps skipped and the final weights: they must be the same on both ranks, bit for bit (DDP averages gradients, so
equal weights stay equal).
"""

import os
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import vitkit
from vitkit.train import distributed as D
from vitkit.train.loop import StepState, TrainingDiverged, train_one_epoch
from vitkit.train.optim import build_optimizer
from vitkit.train.schedule import WarmupCosine

from .conftest import free_port, tiny_kwargs

WORLD, BATCH, GRAD_ACCUM, STEPS = 2, 4, 2, 5
# Micro-batches whose images are NaN on rank 1 only: step 1's second micro-batch and step 3's first.
POISONED_ON_RANK1 = {3, 6}
DEADLINE_S = 180  # generous: two processes importing torch and taking 5 tiny steps need a few seconds


def _batches(rank: int, n: int, poisoned: set[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` micro-batches (B, 3, 16, 16) of this rank's own random images; NaN images where `poisoned` says."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(n):
        x, y = torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (BATCH,), generator=g)
        out.append((torch.full_like(x, float("nan")) if i in poisoned else x, y))
    return out


def _skipped_steps(caught: list[warnings.WarningMessage]) -> list[int]:
    """The step numbers of the "step N: non-finite loss ... skipped" warnings."""
    return [int(str(w.message).split(":")[0].split()[1]) for w in caught if "non-finite" in str(w.message)]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(WORLD)
    torch.set_num_threads(1)
    env = D.init_distributed("cpu", timeout_s=60)  # a mismatched collective fails within a minute, not 30
    try:
        assert D.all_ranks_true(True, env) and not D.all_ranks_true(rank == 0, env)  # MIN over ranks

        torch.manual_seed(0)
        model = D.prepare_model(vitkit.create_model("S/16", **tiny_kwargs(img_size=16, patch_size=4)), env)
        opt = build_optimizer(D.unwrap(model), 1e-3, 0.05)
        sched = WarmupCosine(1e-3, STEPS)
        state = StepState()
        poisoned = POISONED_ON_RANK1 if rank == 1 else set()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kw = dict(device=env.device, precision="fp32", grad_accum=GRAD_ACCUM, env=env)
            train_one_epoch(model, _batches(rank, STEPS * GRAD_ACCUM, poisoned), opt, sched, state, **kw)
        skipped = _skipped_steps(caught)

        # a run that diverges on rank 1 alone stops on both ranks with the same error (none waits for the other)
        diverged = ""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bad = set(range(100)) if rank == 1 else set()
                train_one_epoch(model, _batches(rank, 20, bad), opt, sched, StepState(), max_bad_steps=3, **kw)
        except TrainingDiverged as e:
            diverged = str(e)
        weights = {k: v.detach().clone() for k, v in D.unwrap(model).state_dict().items()}
        result = {"step": state.step, "skipped": skipped, "diverged": diverged, "weights": weights}
        torch.save(result, f"{out}/{rank}.pt")
    finally:
        D.teardown(env)


def _spawn_with_deadline(out: str) -> None:
    ctx = mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank run did not finish in {DEADLINE_S} s: the ranks hang in a collective")


def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    _spawn_with_deadline(str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD))

    # micro-batches 3 and 6 fall in the 2nd and 4th pairs; a skipped pair does not advance the step counter, so
    # the skips are reported at steps 1 and 2, and 5 - 2 = 3 optimizer steps are taken
    assert r0["skipped"] == r1["skipped"] == [1, 2]
    assert r0["step"] == r1["step"] == STEPS - len(POISONED_ON_RANK1)
    assert "NaN/Inf for 3 steps in a row" in r0["diverged"] and r0["diverged"] == r1["diverged"]

    torch.manual_seed(0)
    init = vitkit.create_model("S/16", **tiny_kwargs(img_size=16, patch_size=4)).state_dict()
    moved = max((r0["weights"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-4  # the good steps did train (so "equal weights" below is not two untouched copies)
    for k, w in r0["weights"].items():
        assert torch.isfinite(w).all(), f"{k}: a NaN step reached the weights"
        assert torch.equal(w, r1["weights"][k]), f"{k}: the ranks' weights diverged"
