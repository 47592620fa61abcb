"""The one contract between work and the launchers: a ``Job`` is a function every rank runs, and its recipe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.recipe import Recipe


@dataclass(frozen=True)
class Job:
    """``fn(recipe, rank, *args)`` on every rank (``rank``: a ``train.context.Rank``); rank 0's value comes back.

    ``fn`` is a module-level function: Ray and Slurm ship it by name, with ``args`` pickled and the recipe with its
    secrets redacted (they travel in the job's environment). ``name`` is the cluster's name for the job (a Ray Train
    run, a Slurm job; default: the run's name); ``env`` is what every rank needs of this process's environment
    besides the storage secrets (trackers' settings): Ray's workers get it; local and Slurm ranks inherit it. A
    ``resumable`` job is a training run: a stop request checkpoints it (``StopRequested``), Ray relays the driver's
    and keeps an elastic worker range, Slurm requeues it; any other job runs on the largest worker count and is
    simply ended. ``setup`` runs once before any rank starts ``fn``: in the driver (Ray,
    Slurm), or on rank 0 before a barrier (local, torchrun).
    """

    fn: Callable[..., Any]
    recipe: Recipe
    args: tuple[Any, ...] = ()
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)
    resumable: bool = False
    setup: Callable[[], None] | None = None

    @property
    def cluster_name(self) -> str:
        return self.name or self.recipe.run.name
