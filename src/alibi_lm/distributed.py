"""torchrun environment -> process group, model wrapping (DDP or FSDP2), small collective helpers.

Without torchrun (no WORLD_SIZE in the environment) everything degrades to one process and the
helpers are no-ops. Backend: nccl on CUDA, gloo on the CPU. Only rank 0 writes files and prints.

FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per transformer block plus the root) is for
models that do not fit one GPU; it is GPU-oriented: on the CPU/gloo it is only checked to construct
and run, and its throughput there means nothing.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "init_distributed", "shutdown", "wrap_model"]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    from alibi_lm.errors import UserError

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but no CUDA device is available; use cpu")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # Imported before the group exists: torch.distributed.nn, which DDP and FSDP2 import, has functions
        # whose default argument `group=group.WORLD` is evaluated on import; imported after it, they would hold
        # the group until the interpreter exits, and `shutdown` could not stop its threads.
        import torch.distributed.nn as _dist_nn  # noqa: F401

        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    """Leave the process group, and stop its backend's threads now rather than at the interpreter's exit.

    `destroy_process_group` drops torch.distributed's own references to the group only; gloo's worker
    threads live until the group object goes. A worker frees each collective it ran a moment after the
    caller's wait has returned (and a barrier frees the works it waited for when it goes itself); where
    such a work holds the last reference to a tensor that Python code has already dropped, freeing it
    takes the GIL. While Python finalizes, that ends the thread inside a C++ destructor: std::terminate,
    SIGABRT, "terminate called without an active exception". So the references that would keep the
    group alive are dropped here, and its destructor, which releases the GIL and joins the workers after
    they have freed their last works, runs now."""
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    if mesh_module is not None:
        # FSDP2's device meshes hold the group (in `_pg_registry`), and DTensor's sharding and
        # redistribution caches hold the meshes for the life of the process.
        for obj in gc.get_objects():
            # type(obj), not isinstance: isinstance reads obj.__class__, which on torch.distributed's
            # deprecated module attributes (reduce_op) emits a FutureWarning per object
            if issubclass(type(obj), mesh_module.DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
                obj._pg_registry.clear()
    gc.collect()  # the wrapped model's reference cycles (DDP's or FSDP2's hooks and state) hold it too


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over ranks (float64, so that loss sums match the one-process run)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "ddp") -> nn.Module:
    """DDP or FSDP2 around `model` when there are several ranks; the model itself otherwise."""
    if not info.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per block: parameters are gathered block by block in forward and backward.
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
