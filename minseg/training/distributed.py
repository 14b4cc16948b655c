"""Data-parallel training through torch.distributed, set up from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT). Without it the run is one process and these helpers do nothing.

As torchvision's references/detection/utils.init_distributed_mode: gloo on CPU, nccl on CUDA (one GPU per
process, cuda:LOCAL_RANK), DistributedDataParallel averages the gradients, only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (if any); the device of this process."""
    if not launched():
        return World(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def wrap(model: torch.nn.Module, world: World, sync_bn: bool, find_unused: bool) -> torch.nn.Module:
    """DDP around the model (first converting BatchNorm to SyncBatchNorm with sync_bn, CUDA only in torch).
    find_unused: some parameters may get no gradient in a step (a detector's mask head on an image without
    objects), so DDP must not wait for them."""
    if world.size == 1:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [world.device.index] if world.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def gather(obj, world: World) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def mean_of(values: dict[str, float], world: World) -> dict[str, float]:
    """The losses averaged over the ranks (what rank 0 logs)."""
    if world.size == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world.size).tolist()))


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
