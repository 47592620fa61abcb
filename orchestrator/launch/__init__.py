"""Running a ``Job`` on every rank of a cluster. ``run`` is the one place a launcher is chosen by name; each launcher
module (``local``, ``ray_train``, ``slurm``) owns its policy: logging set-up, secrets, the process group, the stop
relay and requeue, and how rank 0's value comes back."""

from __future__ import annotations

from typing import Any

from orchestrator.launch.job import Job
from orchestrator.slurm_options import SlurmOptions

LAUNCHERS = ("ray", "local", "slurm")


def run(job: Job, where: str, slurm: SlurmOptions | None = None) -> Any:
    """Run ``job`` under ``where`` (``local``: this process or torchrun's; ``ray``; ``slurm``: submitted with
    ``slurm``'s options, waited for); rank 0's value (None on a torchrun rank other than 0)."""
    if where == "local":
        from orchestrator.launch import local

        return local.run(job)
    if where == "ray":
        from orchestrator.launch import ray_train

        return ray_train.run(job)
    if where == "slurm":
        from orchestrator.launch import slurm as slurm_launch

        return slurm_launch.run(job, slurm or SlurmOptions())
    raise ValueError(f"launcher {where!r}: expected one of {', '.join(LAUNCHERS)}")
