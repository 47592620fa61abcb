"""Run a job in this process (or on every torchrun rank): what unit tests and debugging use."""

from __future__ import annotations

from typing import Any

from orchestrator.launch.distributed import end_process_group, rank_from_env
from orchestrator.launch.job import Job
from orchestrator.train.context import StopRequested
from orchestrator.train.stop import interrupted


def run(job: Job) -> Any:
    """``job`` on this rank; its value on rank 0, None on the others. A resumable job stops on SIGTERM or Ctrl-C:
    it checkpoints at the next step, then Interrupted says where it resumes."""
    rank = rank_from_env(job.recipe, launcher="local")
    if job.resumable:
        rank.stop.install()
    try:
        if job.setup is not None:
            if rank.is_main:
                job.setup()
            rank.barrier()
        value = job.fn(job.recipe, rank, *job.args)
    except StopRequested as stop:
        raise interrupted(rank.stop.received, stop.step, stop.url) from None
    finally:
        rank.stop.restore()
        end_process_group()
    return value if rank.is_main else None
