"""Slurm job options as recipes and pipeline files give them (``SlurmOptions``) and Slurm's time formats:
plain data, read by the pipeline file, the command lines and the Slurm launcher alike."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import RecipeError
from orchestrator.recipe import Recipe


@dataclass
class SlurmOptions:
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # 0: one CPU task per node
    time: str = "24:00:00"  # HH:MM:SS, D-HH:MM:SS or MM; stages longer than this are requeued
    cpus_per_gpu: int | None = None  # CPUs per task (one task per GPU); default: the recipe's scaling.cpus_per_worker
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    max_requeues: int = 100  # timeouts a stage may go through (preemptions do not count)
    log_dir: str = "slurm_logs"  # submitit's pickles and logs: a shared file system path
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {reservation: x}

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def cpus_per_task(self, recipe: Recipe) -> int:
        return self.cpus_per_gpu or recipe.scaling.cpus_per_worker

    def optional(self) -> dict[str, str]:
        """The sbatch options that are set (partition, mem, account, qos, constraint, exclude)."""
        keys = ("partition", "mem", "account", "qos", "constraint", "exclude")
        return {k: getattr(self, k) for k in keys if getattr(self, k)}


def minutes(time: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time.strip())
    if not m:
        raise RecipeError(f"slurm time {time!r}: expected HH:MM:SS, D-HH:MM:SS or minutes")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        total = days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    elif c is not None:  # HH:MM:SS
        total = a * 60 + b + c / 60
    elif b is not None:  # MM:SS
        total = a + b / 60
    else:
        total = a
    if total < 1:
        raise RecipeError(f"slurm time {time!r}: at least one minute")
    return int(total)
