"""Data parallelism on CPU (gloo, 2 processes): DDP and FSDP2 take the same steps as one process with the union
batch, FSDP2 writes a checkpoint one process loads, and resume under 2 ranks is exact.

Tolerance: 2 ranks x batch b vs 1 process x batch 2b compute the same mean gradient, but the cross-entropy mean and
the gradient sums over the batch are added in another order (per-rank partial sums, then the all-reduce average),
so each parameter differs by float32 round-off, ~1e-7 relative per step; AdamW divides by sqrt(v) and can amplify
that for near-zero gradients. After 3 steps at lr 1e-3 we allow 2e-5 absolute on weights of magnitude ~0.02-1;
a wrong shard (other samples), a missing average (sum instead of mean) or a missing all-reduce moves weights by
~1e-3 (lr-sized steps) and fails by far.
"""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import vitkit
from vitkit.data.loader import BatchLoader
from vitkit.data.sources import ImageArrayDataset
from vitkit.train import distributed as D

from .conftest import free_port, tiny_model

STEPS, PER_RANK_BATCH, WORLD = 3, 4, 2
ATOL = 2e-5


def _dataset() -> ImageArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    return ImageArrayDataset(images=images, labels=rng.integers(0, 5, 64), classes=list("abcde"), source="random")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0  # (B, 3, 16, 16) uint8 -> [-1, 1]


def _model() -> vitkit.VisionTransformer:
    # seeded: identical initial weights on every rank (DDP would broadcast rank 0's anyway)
    return tiny_model("S/16", img_size=16, patch_size=4, depth=2)


def _train(model, opt, loader, steps: int) -> list[np.ndarray]:
    """`steps` plain fp32 AdamW steps; returns the sample indices each step used on this rank."""
    seen = []
    batches = iter(loader)
    order = loader.batch_indices()
    for _ in range(steps):
        seen.append(order[loader.batch_index])
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(_to_float(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return seen


def _worker(rank: int, port: int, out: str, fsdp: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(WORLD)
    torch.set_num_threads(1)
    env = D.init_distributed("cpu")
    assert env.distributed and env.rank == rank and env.backend == "gloo"
    try:
        model = D.prepare_model(_model(), env, fsdp=fsdp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = BatchLoader(_dataset(), None, PER_RANK_BATCH, seed=1, rank=env.rank, world_size=env.world_size)
        seen = _train(model, opt, loader, STEPS)
        D.save_full_model(model, f"{out}/model.safetensors", env)
        np.save(f"{out}/seen{rank}.npy", np.stack(seen))

        # exact resume: checkpoint (model, optimizer, every rank's loader + RNG), train on, then restore and redo
        model_state = D.full_model_state_dict(model, env)
        opt_state = D.full_optimizer_state_dict(model, opt, env)
        ranks = D.gather_rank_states(env, loader)
        objs = [model_state, opt_state, ranks]
        torch.distributed.broadcast_object_list(objs, src=0)  # stands in for every rank reading the checkpoint
        model_state, opt_state, ranks = objs
        torch.rand(3)  # move this rank's RNG on, so that restoring it matters
        _train(model, opt, loader, 2)
        after = D.full_model_state_dict(model, env)

        fresh = D.prepare_model(_model(), env, fsdp=fsdp)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        fresh_loader = BatchLoader(_dataset(), None, PER_RANK_BATCH, seed=1, rank=env.rank, world_size=env.world_size)
        D.load_full_model_state_dict(fresh, model_state, env)
        D.load_full_optimizer_state_dict(fresh, fresh_opt, opt_state, env)
        D.restore_rank_state(ranks, env, fresh_loader)
        _train(fresh, fresh_opt, fresh_loader, 2)
        resumed = D.full_model_state_dict(fresh, env)
        if env.is_main:
            torch.save({"after": after, "resumed": resumed}, f"{out}/resume.pt")
    finally:
        D.teardown(env)
    # Every output is written and the group is left. Skip the interpreter's finalisation: under a loaded suite a
    # spawned FSDP2 child has been seen to abort in C++ destructors at exit ("terminate called without an active
    # exception"), after its work was done, which the parent reports as a failure.
    os._exit(0)


def _single_process_reference(steps: int = STEPS) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = BatchLoader(_dataset(), None, WORLD * PER_RANK_BATCH, seed=1)
    seen = _train(model, opt, loader, steps)
    return model.state_dict(), seen


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_equal_one_process_with_the_union_batch(tmp_path, fsdp):
    mp.spawn(_worker, args=(free_port(), str(tmp_path), fsdp), nprocs=WORLD, join=True)
    reference, ref_seen = _single_process_reference()

    # the single process saw exactly the union of the two shards, step by step
    shards = [np.load(tmp_path / f"seen{r}.npy") for r in range(WORLD)]
    for step in range(STEPS):
        assert sorted(np.concatenate([s[step] for s in shards])) == sorted(ref_seen[step])

    loaded = vitkit.from_pretrained(tmp_path / "model.safetensors")  # one process, no process group
    assert loaded.cfg == _model().cfg
    got = loaded.state_dict()
    assert set(got) == set(reference)
    moved = max((reference[k] - _model().state_dict()[k]).abs().max().item() for k in reference)
    assert moved > 100 * ATOL  # the steps really changed the weights, so the comparison below means something
    for name, ref in reference.items():
        torch.testing.assert_close(got[name], ref, rtol=0, atol=ATOL, msg=name)

    resume = torch.load(tmp_path / "resume.pt", weights_only=True)
    for name, value in resume["after"].items():
        assert torch.equal(resume["resumed"][name], value), f"resume under 2 ranks is not exact: {name}"


def test_single_process_env_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = D.init_distributed("cpu")
    assert not env.distributed and env.is_main and env.backend is None
    model = _model()
    assert D.prepare_model(model, env) is model and D.unwrap(model) is model
    loader = BatchLoader(_dataset(), None, 8, seed=1)
    next(iter(loader))
    states = D.gather_rank_states(env, loader)
    assert states["world_size"] == 1 and states["ranks"][0]["loader"]["batch_index"] == 1
    with pytest.raises(ValueError, match="--nproc_per_node 2"):
        D.restore_rank_state({"world_size": 2, "ranks": [{}, {}]}, env)
