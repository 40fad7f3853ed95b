"""Data-parallel training over several processes with `torch.distributed`, launched by torchrun.

    torchrun --nproc_per_node=4 -m asbnn.cli train CONFIG ...          # one node, 4 GPUs
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_endpoint=HOST:29500 -m asbnn.cli train CONFIG ...

Every process builds the same global batch (the shuffling and augmentation generator is seeded
by (seed, epoch) alike on all ranks) and trains on its own slice of it, drawing its own weight
noise and running AS on its slice; gradients are averaged over the ranks after each backward
pass, so the KL, added once per rank, counts once. Rank 0 alone logs, checkpoints and evaluates.
BatchNorm uses each rank's batch statistics, as in plain DistributedDataParallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun launch (or a lone process), before any group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment; a lone process stays alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def shard(x: Tensor, y: Tensor, ranks: Ranks) -> tuple[Tensor, Tensor]:
    """This rank's contiguous slice of the global batch."""
    if ranks.world == 1:
        return x, y
    if len(y) % ranks.world:
        raise ConfigError(f"batch size {len(y)} must be divisible by the {ranks.world} processes")
    size = len(y) // ranks.world
    part = slice(ranks.rank * size, (ranks.rank + 1) * size)
    return x[part], y[part]


def average_gradients(net: nn.Module, ranks: Ranks) -> None:
    """Average the gradients of all ranks in one all-reduce over a flat buffer."""
    if ranks.world == 1:
        return
    params = [p for p in net.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= ranks.world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


def reduce(value: Tensor, ranks: Ranks, op: str = "sum") -> Tensor:
    """Sum (or max) of a tensor over the ranks; the tensor itself on a lone process."""
    if ranks.world > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return value


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()
