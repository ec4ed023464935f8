"""The few collectives data parallelism needs (under torchrun or accelerate launch); no-ops in one process.

Processes start from the launcher's environment (`WORLD_SIZE`, `RANK`, …): NCCL where there are GPUs, gloo on
CPU. Gradient rules call these directly, so their statistics are those of the global batch on every process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import Tensor

from loralab.launching import launched


def cpu_only() -> bool:
    """Whether accelerate must be told to use gloo on CPU: a multi-process launch on a machine without CUDA."""
    return launched() and not torch.cuda.is_available()


def start() -> PartialState:
    """Join this launch's process group (once per process; later calls return the same state)."""
    return PartialState(cpu=cpu_only())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """The process that writes the run directory (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_sum(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over processes (a new tensor; `tensor` itself in one process)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def all_mean_(tensors: list[Tensor]) -> None:
    """Average tensors in place over processes, in one all-reduce of their float32 concatenation."""
    processes = world_size()
    if processes == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= processes
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def broadcast_(tensors: list[Tensor]) -> None:
    """Overwrite tensors in place with the main process's (exactly, in their own dtypes)."""
    if world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
