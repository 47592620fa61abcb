"""What a rank gets from whoever launched it (``Rank``), and what the training loop adds to it (``TrainContext``).

A launcher makes one ``Rank`` per process and hands it to the job's function; its hooks are how the launcher's
policy reaches the loop: ``relayed`` (a stop request the driver relays: Ray), ``report`` (metrics for Ray/Tune)
and ``on_stall`` (the end of a stalled attempt: Slurm requeues). The training context serves every launcher the
same way: checkpoints go straight into the run folder through its commit protocol (``RunDir``), uploaded by rank
0 in the background; a stop request is agreed on by all ranks, one step late so that agreeing never makes the
host wait for the step the device is running.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from orchestrator import faults
from orchestrator.recipe import Recipe
from orchestrator.rundir import RunDir
from orchestrator.train.checkpoint import BackgroundCommitter, Snapshot
from orchestrator.train.stop import StopSignals
from orchestrator.train.watchdog import Watchdog, exit_process


class LaggedAgreement:
    """A flag OR-ed over all ranks without stalling the step: each call starts this step's all-reduce and
    returns the previous call's result, which the device finished while the host queued this step (on
    CUDA the result comes back by a non-blocking copy and an event, so the host never drains the queue).
    Every rank gets the same answer at the same call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: tuple[Any, torch.Tensor, Any] | None = None

    def __call__(self, flag: bool) -> bool:
        agreed = self.result()
        t = torch.full((1,), float(flag), device=self.device)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # NCCL: this stream waits for the all-reduce; the host does not
            host = torch.empty(1, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (None, host, event)
        else:
            self.pending = (work, t, None)
        return agreed

    def result(self) -> bool:
        """The last started agreement's answer (False before the first), waiting for it if it is not in."""
        if self.pending is None:
            return False
        work, value, event = self.pending
        if event is not None:
            event.synchronize()
        else:
            work.wait()
        return bool(value[0] > 0)


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """The loop stopped early because ``ctx.stop_requested()`` said so, checkpointed at ``step`` in ``url``."""

    def __init__(self, step: int, url: str) -> None:
        super().__init__(step, url)
        self.step, self.url = step, url


@dataclass(kw_only=True)
class Rank:
    """One process of a job: where it is, how its launcher reaches it. ``stop`` is installed by the launcher where
    signals reach the process (its main thread); a Ray worker's comes through ``relayed`` instead."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node: str = field(default_factory=socket.gethostname)  # the launcher's name for this rank's machine
    launcher: str = "local"
    stop: StopSignals = field(default_factory=StopSignals)
    relayed: Callable[[], int | None] | None = field(default=None, repr=False)  # the driver's stop request, if any
    report: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)  # per-epoch metrics (Ray/Tune)
    on_stall: Callable[[str], None] | None = field(default=None, repr=False)  # default: exit non-zero with the line

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()


@dataclass(kw_only=True)
class TrainContext(Rank):
    run: RunDir
    keep_checkpoints: int = 3
    committer: BackgroundCommitter | None = field(default=None, repr=False)
    agreement: LaggedAgreement | None = field(default=None, repr=False)
    watchdog: Watchdog | None = field(default=None, repr=False)  # the loop starts it (run.stall_timeout_s)
    _asked: float = field(default=0.0, repr=False)  # when ``relayed`` was last asked (at most once a second)

    @classmethod
    def of(cls, recipe: Recipe, rank: Rank) -> TrainContext:
        """The training context of ``recipe``'s run on ``rank``."""
        given = {f.name: getattr(rank, f.name) for f in dataclasses.fields(Rank)}
        return cls(**given, run=RunDir.of(recipe), keep_checkpoints=recipe.run.keep_checkpoints)

    def save_checkpoint(self, step: int, snapshot: Snapshot | None, meta: dict[str, Any]) -> None:
        """Called on every rank; rank 0 passes the state staged in host memory, which is encoded, committed
        and old checkpoints pruned in the background. ``flush`` waits for that. An injected fault
        (``orchestrator.faults``) fires here, on every launcher."""
        if not self.is_main and self.watchdog is not None:
            self.watchdog.peer_waiting = True  # until the next step: rank 0 may wait for its previous upload first
        if self.is_main:
            assert snapshot is not None
            faults.maybe_tear(self.run, step, self.rank, snapshot)
            if self.committer is None:
                self.committer = BackgroundCommitter(self.run, self.keep_checkpoints, progress=self.tick)
            self.committer.submit(step, snapshot, meta)
        if faults.armed(step):
            self.flush()  # every rank: the fault comes right after this checkpoint is committed
            faults.maybe_fail(self.run, step, self.rank)

    def uploading(self) -> bool:
        """Whether rank 0's previous checkpoint is still being encoded or uploaded."""
        return self.committer is not None and self.committer.busy()

    def flush(self) -> None:
        """Wait until every checkpoint handed to ``save_checkpoint`` is committed (raises if one failed)."""
        if self.committer is not None:
            self.committer.wait()
        self.barrier()

    def stop_requested(self) -> bool:
        """Asked after every step, on every rank: True makes the loop checkpoint and raise StopRequested.

        True on every rank at the same step once any rank saw a stop request: with several ranks, at the
        step after the one where it was seen (``LaggedAgreement``).
        """
        flag = self.poll_stop()
        if self.world_size > 1 and dist.is_initialized():
            if self.agreement is None:
                self.agreement = LaggedAgreement(self.device)
            return self.agreement(flag)
        return flag

    def stop_reason(self) -> str:
        """What stopped the loop, for its ``stop`` record: this rank's signal, or another rank's request."""
        return signal.Signals(self.stop.received).name if self.stop.received else "another rank's stop request"

    def poll_stop(self) -> bool:
        """This rank's own view: a signal it caught, or one its driver relayed (asked at most once a second)."""
        if self.relayed is not None and self.stop.received is None and time.monotonic() - self._asked > 1.0:
            self._asked = time.monotonic()
            signum = self.relayed()
            if signum:
                self.stop.request(signum)
        return self.stop.received is not None

    def tick(self) -> None:
        """Progress for the stall watchdog (a micro-batch, an evaluation batch, a checkpoint chunk)."""
        if self.watchdog is not None:
            self.watchdog.tick()

    def stalled(self, line: str) -> None:
        """The watchdog found no progress: end this attempt so the launcher's recovery takes over: the launcher's
        ``on_stall`` (Slurm requeues), else exit non-zero with ``line`` (local, torchrun; Ray restarts the group)."""
        (self.on_stall or exit_process(1))(line)

    def report_metrics(self, metrics: dict[str, Any]) -> None:
        """Per-epoch metrics for the launcher (Ray/Tune), on every rank; files are written by the loop itself."""
        if self.report is not None:
            self.report(metrics)
