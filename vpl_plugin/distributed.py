"""PyTorch's own distributed engine, as ``torchrun`` sets it up.

``torchrun --nproc_per_node N -m vpl_plugin train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. These
helpers read that environment, start the process group (NCCL on CUDA, gloo on CPU) and do nothing
at all in a plain single-process run, so every command works the same with or without torchrun.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "dist_env", "init_distributed", "is_main", "barrier", "destroy", "all_reduce_sum",
           "all_gather_object", "all_gather_tensor", "is_initialized"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job (``world_size == 1`` outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by "
                         f"torchrun, so unset it when not running under torchrun.") from None


def dist_env() -> DistEnv:
    """The torchrun environment of this process (rank 0 of 1 when it is not set)."""
    env = DistEnv(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                  local_rank=_env_int("LOCAL_RANK", 0))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={env.rank}, WORLD_SIZE={env.world_size}.")
    return env


def init_distributed(device: str = "cpu", backend: Optional[str] = None) -> DistEnv:
    """Start the process group when running under torchrun (idempotent); return the environment.

    Args:
        device: ``"cpu"`` or ``"cuda"``. On CUDA each process uses ``cuda:LOCAL_RANK``.
        backend: ``"nccl"`` or ``"gloo"``; default NCCL on CUDA, gloo on CPU.

    Collective operations time out after ``$VPL_DIST_TIMEOUT_MIN`` minutes (default 360).
    """
    env = dist_env()
    if not env.distributed:
        return env
    if str(device).startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        # rank 0 alone may work for a long while between barriers (CLIP-CPAL's context bank over a
        # whole split): allow hours, not PyTorch's default 10 (NCCL) / 30 (gloo) minutes
        minutes = float(os.environ.get("VPL_DIST_TIMEOUT_MIN", 6 * 60))
        dist.init_process_group(backend=backend or ("nccl" if str(device).startswith("cuda") else "gloo"),
                                rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(minutes=minutes))
    return env


def is_initialized() -> bool:
    """True once a process group exists (started here or by the caller)."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op without a process group); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (same shape, dtype and device on every rank), in rank order;
    ``[tensor]`` without a process group."""
    if not dist.is_initialized():
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group.

    Example:
        >>> all_gather_object({"done": 3})
        [{'done': 3}]
    """
    if not dist.is_initialized():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def destroy() -> None:
    """Tear the process group down (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
