"""Training on several processes with PyTorch's own engine: `torchrun --nproc_per_node N -m vitkit train ...`.

One process per device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
`init_distributed()` reads them and joins the process group (gloo on CPU, NCCL on CUDA). Without them
everything here is a no-op and training runs in one process as before.

    env = init_distributed()
    loader = BatchLoader(..., rank=env.rank, world_size=env.world_size)  # each rank its own global batches
    model = prepare_model(model, env, fsdp=False)  # DDP (gradients averaged) or FSDP2 (parameters sharded)
    ...
    state = full_model_state_dict(model, env)  # collective: every rank calls it; rank 0 gets the full dict
    if env.is_main: save(...)
    teardown(env)

Data parallelism here is exact: the ranks' gradients are averaged, so N ranks x batch b take the same step as
one process x batch N*b on the union of their samples (up to float summation order).

Resume under torchrun keeps the exact-resume guarantee: the checkpoint holds every rank's loader position and
RNG state (`gather_rank_states`), and each rank restores its own (`restore_rank_state`).
"""

from __future__ import annotations

import copy
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` processes and the device it drives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "gloo" | "nccl" | None (single process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by torchrun's environment variables, or describe a single process.

    Args:
        device: "cpu", "cuda" or None (CUDA when available). Under torchrun with CUDA each rank takes
            `cuda:LOCAL_RANK`.
        timeout_s: how long a collective may wait for the other ranks before failing.
    """
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    world_size = env_world_size()
    if world_size <= 1:
        dev = torch.device(device) if device is not None else torch.device("cuda" if want_cuda else "cpu")
        return DistEnv(device=dev)
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with "
            "`torchrun --nproc_per_node N -m vitkit train ...`"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if want_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
    return DistEnv(rank, world_size, local_rank, dev, backend)


def teardown(env: DistEnv) -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still needs it)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- the model
def prepare_model(model: nn.Module, env: DistEnv, fsdp: bool = False, bf16_params: bool = False) -> nn.Module:
    """Move the model to this rank's device and wrap it for data parallelism.

    DDP (default): every rank keeps all weights; gradients are averaged across ranks in backward.
    FSDP2 (`fsdp=True`): `fully_shard` each block, then the root, so each rank stores 1/N of the weights,
    gradients and optimizer state; a block's weights are gathered just for its forward and backward.
    `bf16_params` (FSDP2 only) gathers weights and reduces gradients in bf16 (fp32 master weights stay sharded).
    With one process the model is only moved to the device.
    """
    model = model.to(env.device)
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for block in model.blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)  # the root: embeddings, final norm, pool and head
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # A conv weight with a size-1 dim (e.g. a 1-channel patch embedding) has two valid contiguous stride sets;
    # DDP then warns on every step that the grad's strides differ from its bucket's. Harmless: silence just that.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The VisionTransformer inside a DDP wrapper (FSDP2 shards in place, so that model is returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The complete, unsharded state dict on CPU, for saving. Collective under FSDP2: every rank must call it.

    Rank 0 receives the full dict; under FSDP2 other ranks receive {} (nothing to save there).
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}  # a snapshot


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Load a full (unsharded) state dict into a plain, DDP or FSDP2 model; every rank passes the same dict."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = dict(state)  # set_model_state_dict replaces the entries with shards; keep the caller's dict whole
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """The optimizer state with unsharded tensors on CPU (collective under FSDP2; rank 0 gets it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # a snapshot: unsharded tensors are gathered copies, but e.g. AdamW's `step` comes back as the live tensor
        return copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=opts))
    return copy.deepcopy(optimizer.state_dict())  # DDP: every rank holds the same, complete state; a snapshot


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv):
    """Inverse of `full_optimizer_state_dict`; every rank passes the same full state."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = {  # it may replace entries with shards; keep the caller's dicts whole
            "state": {k: dict(v) for k, v in state["state"].items()},
            "param_groups": [dict(g) for g in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def save_full_model(model: nn.Module, path, env: DistEnv, **metadata: str):
    """Write a vitkit safetensors checkpoint from a plain, DDP or FSDP2 model: all ranks call, rank 0 writes.

    Returns the path on rank 0 and None elsewhere. The file loads in one process with `vitkit.from_pretrained`.
    """
    from safetensors.torch import save as st_save

    from ..files import atomic_write_bytes
    from ..model.serialization import build_metadata

    state = full_model_state_dict(model, env)
    written = None
    if env.is_main:
        tensors = {k: v.contiguous() for k, v in state.items()}
        written = atomic_write_bytes(path, st_save(tensors, metadata=build_metadata(unwrap(model), **metadata)))
    barrier(env)
    return written


# ------------------------------------------------------------------------------- exact resume, per rank
def rank_state(loader: Any | None = None) -> dict[str, Any]:
    """This rank's position and randomness: loader state (epoch, batch) and the RNG states it draws from."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if loader is not None:
        state["loader"] = loader.state_dict()
    return state


def gather_rank_states(env: DistEnv, loader: Any | None = None) -> dict[str, Any]:
    """Every rank's `rank_state`, gathered for rank 0 to save (collective: all ranks call it).

    Returns {"world_size": N, "ranks": [state of rank 0, ..., state of rank N-1]} on rank 0, {} elsewhere.
    """
    mine = rank_state(loader)
    if not env.distributed:
        return {"world_size": 1, "ranks": [mine]}
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    return {"world_size": env.world_size, "ranks": gathered} if env.is_main else {}


def restore_rank_state(states: dict[str, Any], env: DistEnv, loader: Any | None = None) -> None:
    """Restore this rank's loader position and RNG states from `gather_rank_states`' output.

    The world size must be the one the run was saved with: the data order is sharded by rank, so another
    number of ranks would see other batches (the guarantee would silently break).
    """
    saved = int(states.get("world_size", 1))
    if saved != env.world_size:
        raise ValueError(
            f"this checkpoint was written by {saved} process(es) but the run now has {env.world_size}; resume "
            f"with the same number (`torchrun --nproc_per_node {saved}`) to keep the exact data order"
        )
    mine = states["ranks"][env.rank]
    torch.set_rng_state(mine["torch_rng"])
    if "cuda_rng" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda_rng"])
    if loader is not None and "loader" in mine:
        loader.load_state_dict(mine["loader"])


# -------------------------------------------------------------------------------------------- metrics
def all_reduce_sum(values: list[float] | torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum numbers (e.g. correct counts, sample counts, loss sums) over all ranks; float64 on CPU."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if env.distributed:
        t = t.to(env.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_ranks_true(flag: bool | torch.Tensor, env: DistEnv | None) -> bool:
    """True only when `flag` is true on every rank (a MIN all-reduce of 0/1; collective: all ranks call it).

    For decisions that change control flow, e.g. skipping a step on a NaN loss: if one rank skipped backward
    while another ran it, their gradient all-reduces would pair up with the wrong steps (or hang).
    One process: the flag itself.
    """
    if env is None or not env.distributed:
        return bool(flag)
    t = torch.as_tensor(flag).to(device=env.device, dtype=torch.int32).reshape(1)  # (1,) 0/1 on this rank's device
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def from_main(value: float, env: DistEnv | None) -> float:
    """Rank 0's `value` on every rank (a broadcast of one float64; collective: all ranks call it). One process: value.

    For decisions that rank 0 takes for everyone, e.g. a wall-clock budget: each rank keeps its own clock, and two
    clocks may disagree by a step (one rank stops, the other waits in its gradient all-reduce forever) or lay the
    schedule over different step counts (different learning rates). Exact for integers below 2**53.
    """
    if env is None or not env.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)  # (1,) on this rank's device
    dist.broadcast(t, src=0)
    return t.item()


def print_main(env: DistEnv, *args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if env.is_main:
        print(*args, **kwargs)


__all__ = [
    "DistEnv",
    "init_distributed",
    "teardown",
    "barrier",
    "prepare_model",
    "unwrap",
    "is_fsdp",
    "full_model_state_dict",
    "load_full_model_state_dict",
    "full_optimizer_state_dict",
    "load_full_optimizer_state_dict",
    "save_full_model",
    "rank_state",
    "gather_rank_states",
    "restore_rank_state",
    "all_reduce_sum",
    "all_ranks_true",
    "from_main",
    "print_main",
    "env_world_size",
]
