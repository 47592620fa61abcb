"""What the training loop needs from whoever launched it; each launcher adapts this in a few lines.

The base class serves every launcher: checkpoints go straight into the run folder through its
commit protocol (``RunDir``), uploaded by rank 0 in the background; a stop request (a signal) is agreed
on by all ranks. Launchers override ``poll_stop`` (Ray relays requests) and ``report`` (Ray/Tune).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.rundir import RunDir
from orchestrator.train.checkpoint import BackgroundCommitter
from orchestrator.train.stop import StopSignals


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """The loop stopped early because ``ctx.stop_requested()`` said so; its checkpoint is saved."""


@dataclass
class TrainContext:
    run: RunDir
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    keep_checkpoints: int = 3
    launcher: str = "local"
    stop: StopSignals = field(default_factory=StopSignals)  # the launcher installs it where signals reach the loop
    committer: BackgroundCommitter | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def save_checkpoint(self, step: int, files: dict[str, bytes] | None, meta: dict[str, Any]) -> None:
        """Called on every rank; rank 0 passes the files (a host-memory snapshot), which are committed
        and old checkpoints pruned in the background. ``flush`` waits for that."""
        if self.is_main:
            assert files is not None
            if self.committer is None:
                self.committer = BackgroundCommitter(self.run, self.keep_checkpoints)
            self.committer.submit(step, files, meta)

    def flush(self) -> None:
        """Wait until every checkpoint handed to ``save_checkpoint`` is committed (raises if one failed)."""
        if self.committer is not None:
            self.committer.wait()
        self.barrier()

    def stop_requested(self) -> bool:
        """Asked after every step, on every rank: True makes the loop checkpoint and raise StopRequested.

        True on every rank once any rank saw a stop request, so that all stop at the same step.
        """
        flag = self.poll_stop()
        if self.world_size > 1 and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def poll_stop(self) -> bool:
        """This rank's own view: a signal it caught (launchers that relay requests override this)."""
        return self.stop.received is not None

    def report(self, metrics: dict[str, Any]) -> None:
        """Per-epoch metrics for the launcher (Ray/Tune), on every rank; files are written by the loop itself."""
