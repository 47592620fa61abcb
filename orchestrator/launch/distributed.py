"""torch.distributed set-up from the usual environment (torchrun, Slurm via submitit, or none)."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from orchestrator.recipe import Recipe
from orchestrator.rundir import RunDir
from orchestrator.train.context import TrainContext


def device_for(local_rank: int, use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(rank: int, world_size: int, device: torch.device) -> None:
    """NCCL on GPU, gloo on CPU; a no-op for a single process."""
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30))


def context_from_env(recipe: Recipe, launcher: str) -> TrainContext:
    """A context for ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun); one CPU/GPU process when unset."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = device_for(local_rank, recipe.scaling.gpus_per_worker > 0)
    init_process_group(rank, world, device)
    return TrainContext(run=RunDir.of(recipe), rank=rank, world_size=world, local_rank=local_rank, device=device,
                        keep_checkpoints=recipe.run.keep_checkpoints, launcher=launcher,
                        node=os.environ.get("SLURMD_NODENAME") or socket.gethostname())
