"""Data-parallel training across processes started by `torchrun` (DDP): one process per GPU, or CPU processes on
the gloo backend.

    info = init_from_env()      # reads RANK / WORLD_SIZE / LOCAL_RANK; a single process when they are absent
    model = wrap(model, info)   # DistributedDataParallel when world_size > 1
    ...
    shutdown(info)

Each rank trains its own batches (buckets.BatchPlan) and its own Explicit Uniform Sampling intervals
(timesteps.TimestepSampler); DDP averages the gradients, so every rank holds the same weights after each step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CogVXError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str | torch.device | None = None) -> DistInfo:
    """The process's place in a torchrun launch (and its device); starts the process group when there are several.

    device: "cpu", "cuda" or None (CUDA when available). On CUDA each process takes GPU LOCAL_RANK and NCCL; on the
    CPU processes talk over gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CogVXError("--device cuda: no CUDA device is available; use --device cpu.")
        if local >= torch.cuda.device_count():
            raise CogVXError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; start "
                             "torchrun with --nproc-per-node at most the number of GPUs.")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel over the trainable parameters (the frozen base is not synchronised)."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over ranks (the tensor itself in a single process)."""
    if not info.distributed:
        return value
    out = value.detach().clone().to(info.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def all_true(flag: bool, info: DistInfo) -> bool:
    """True when `flag` holds on every rank."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
