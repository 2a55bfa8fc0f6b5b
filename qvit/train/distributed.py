"""DistributedDataParallel plumbing for `torchrun -m qvit train`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we pick NCCL on GPUs and gloo on
the CPU. Calibration runs on rank 0 and its result is broadcast, logging and
checkpointing happen on rank 0 only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    enabled: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init(device: Optional[str] = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = env_world_size()
    if world <= 1:
        return DistInfo(device=torch.device(want))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(want)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(True, rank, world, local_rank, dev)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of rank ``src`` to all ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dtype == torch.bool:  # not every backend broadcasts bool
                tmp = t.data.to(torch.uint8)
                dist.broadcast(tmp, src)
                t.data.copy_(tmp.bool())
            else:
                dist.broadcast(t.data, src)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]
