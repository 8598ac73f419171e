"""What code that runs a module whose weights may be sharded across processes (FSDP2,
:mod:`diffalign.train.fsdp2`) needs to know: whether it is, a tensor's own part, and how many
forwards every process must make.

Under FSDP2 every forward of the module gathers each block's weights from every process, so a
loop whose length depends on the data (an inversion to each item's timestep, a sampler stopped at
a random step, text generated until it ends) must run as long on every process: the short ones
pad with forwards whose outputs they drop.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

SHARDED_STATE = "sharded_state"  # a checkpoint's folder of an FSDP2 run's shards (diffalign.train.fsdp2)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (a DTensor's local shard; any other tensor as it is)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s weights are sharded across the processes (its parameters DTensors)."""
    first = next(module.parameters(), None)
    return isinstance(first, DTensor)


def most_over_processes(count: int, module: nn.Module) -> int:
    """``count`` (how many forwards a loop of this process needs) when ``module`` is whole; when it is sharded, the
    largest ``count`` of all processes, which each must reach with padding forwards of its own, since every forward
    gathers weights from every process. Every process must call it at the same point."""
    if not is_sharded(module):
        return count
    most = torch.tensor([count], device=local(next(module.parameters())).device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())
