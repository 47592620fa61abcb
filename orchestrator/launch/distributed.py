"""torch.distributed set-up from the usual environment (torchrun, Slurm via submitit, or none)."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from orchestrator.recipe import Recipe
from orchestrator.train.context import Rank


def device_for(local_rank: int, use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def collective_timeout(recipe: Recipe) -> datetime.timedelta:
    """The process group's timeout: a minute past the stall watchdog's, so a rank blocked in a collective
    whose peer died or stalled is released even where its watchdog could not end it, while the watchdog
    (stacks, then the launcher's recovery) acts first. torch's 30 minutes without a watchdog."""
    return datetime.timedelta(seconds=recipe.run.stall_timeout_s + 60 if recipe.run.stall_timeout_s else 1800)


def init_process_group(rank: int, world_size: int, device: torch.device, timeout: datetime.timedelta) -> None:
    """NCCL on GPU (its errors and timeouts abort the communicator: async error handling), gloo on CPU;
    a no-op for a single process."""
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)


def rank_from_env(recipe: Recipe, launcher: str) -> Rank:
    """This process's ``Rank`` from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, submitit), its process group
    started; one CPU/GPU process when they are unset."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = device_for(local_rank, recipe.scaling.gpus_per_worker > 0)
    init_process_group(rank, world, device, collective_timeout(recipe))
    return Rank(rank=rank, world_size=world, local_rank=local_rank, device=device, launcher=launcher,
                node=os.environ.get("SLURMD_NODENAME") or socket.gethostname())


def end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
