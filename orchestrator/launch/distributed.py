"""torch.distributed set-up from the usual environment (torchrun, Slurm via submitit, or none)."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from orchestrator.recipe import Recipe
from orchestrator.train.context import Rank

log = logging.getLogger(__name__)


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
    out = Rank(rank=rank, world_size=world, local_rank=local_rank, device=device, launcher=launcher,
               node=os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    share_host_cores(out)
    return out


def share_host_cores(rank: Rank) -> None:
    """CPU ranks on one machine split its cores: at most cores / ranks-on-the-machine torch threads each. Ray gives a
    worker as many threads as CPUs it asked for, torchrun one; where a launcher declares more CPUs than the machine
    has (two Ray nodes on one laptop), each rank ran a thread pool the size of the machine and the pools' spinning
    barriers made a step 3-6x slower than one thread each (atto, 2 ranks on 2 cores: 50 against 165 images/s).
    Collective: every rank calls it."""
    if rank.device.type != "cpu" or rank.world_size == 1 or not dist.is_initialized():
        return
    hosts: list[str | None] = [None] * rank.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    sharing, cores = hosts.count(socket.gethostname()), len(os.sched_getaffinity(0))
    fair = max(1, cores // sharing)
    if torch.get_num_threads() > fair:
        log.info("rank %d: %d ranks share this machine's %d cores: %d torch thread(s) each, not %d", rank.rank,
                 sharing, cores, fair, torch.get_num_threads())
        torch.set_num_threads(fair)


def end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
