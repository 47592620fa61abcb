"""What the training loop needs from whoever launched it; each launcher adapts this in a few lines.

The base class serves every launcher that has a shared storage URL for the run (local, torchrun,
Slurm): checkpoints go straight to ``<run>/checkpoints``. Ray overrides the checkpoint methods so
that Ray Train owns persistence (see ``orchestrator/launch/ray_train.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.data import storage
from orchestrator.train import checkpoint


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """The loop stopped early because ``ctx.stop_requested()`` said so; its checkpoint is saved."""


@dataclass
class TrainContext:
    run_dir: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    storage_options: dict[str, Any] = field(default_factory=dict)
    keep_checkpoints: int = 3

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoints_url(self) -> str:
        return storage.join(self.run_dir, "checkpoints")

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def latest_checkpoint(self) -> str | None:
        """URL of the newest complete checkpoint of this run, if any."""
        return checkpoint.latest(self.checkpoints_url, self.storage_options)

    def save_checkpoint(self, step: int, write: Callable[[str], None], metrics: dict[str, Any]) -> None:
        """Called on every rank; rank 0 writes via ``write(folder_url)``, then the checkpoint is committed."""
        if self.is_main:
            url = checkpoint.step_dir(self.checkpoints_url, step)
            write(url)
            checkpoint.prune(self.checkpoints_url, self.keep_checkpoints, self.storage_options)
        self.barrier()

    def stop_requested(self) -> bool:
        """Asked after every step, on every rank: True makes the loop checkpoint and raise StopRequested.

        Launchers that get preempted (Slurm) override it; the answer must be the same on all ranks.
        """
        return False

    def report(self, metrics: dict[str, Any]) -> None:
        """Per-epoch metrics for the launcher (Ray/Tune); files are written by the loop itself."""
