"""Slurm through submitit: each pipeline stage is one job, one task per GPU (or one CPU task per node).

The job runs the same training loop and checkpoint format as every other launcher. On the requeue
signal (USR2: Slurm's ``--signal`` before the time limit, or a preemption) every rank stops at the
next step boundary, the loop saves a checkpoint of that step, and submitit requeues the job, which
resumes from it exactly. Before anything is submitted, the controller is pinged and the options are
checked with ``sbatch --test-only``.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import torch
import torch.distributed as dist

from orchestrator.errors import RecipeError
from orchestrator.launch.distributed import context_from_env
from orchestrator.recipe import Recipe, from_dict
from orchestrator.train.context import StopRequested, TrainContext
from orchestrator.train.loop import train

log = logging.getLogger(__name__)
PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's default requeue signal


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


def sbatch_options(options: SlurmOptions, recipe: Recipe) -> dict[str, Any]:
    """submitit executor parameters (``slurm_*``) for one stage."""
    params: dict[str, Any] = {
        "nodes": options.nodes, "tasks_per_node": options.tasks_per_node, "cpus_per_task": options.cpus_per_task(recipe),
        "timeout_min": minutes(options.time), "slurm_signal_delay_s": 120,
    }
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    params |= {f"slurm_{k}": v for k, v in options.optional().items()}
    if options.extra:
        params["slurm_additional_parameters"] = dict(options.extra)
    return params


def check_cluster(options: SlurmOptions, recipe: Recipe) -> None:
    """Controller reachable and options accepted (``sbatch --test-only``), or a RecipeError naming the problem."""
    for tool in ("sbatch", "scontrol", "sacct"):
        if not shutil.which(tool):
            raise RecipeError(f"--launcher slurm: {tool} is not on PATH (is this a Slurm login node?)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    if ping.returncode or "UP" not in ping.stdout:
        raise RecipeError(f"--launcher slurm: the Slurm controller is not reachable (scontrol ping: "
                          f"{(ping.stdout + ping.stderr).strip() or ping.returncode})")
    args = ["sbatch", "--test-only", f"--nodes={options.nodes}", f"--ntasks-per-node={options.tasks_per_node}",
            f"--cpus-per-task={options.cpus_per_task(recipe)}", f"--time={options.time}"]
    if options.gpus_per_node:
        args.append(f"--gpus-per-node={options.gpus_per_node}")
    args += [f"--{k}={v}" for k, v in options.optional().items()]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in options.extra.items()]
    test = subprocess.run([*args, "--wrap=true"], capture_output=True, text=True, timeout=60)
    if test.returncode:
        raise RecipeError(f"Slurm rejected the job options ({' '.join(args[2:])}): {test.stderr.strip()}")


def submit(stage: str, recipe: Recipe, options: SlurmOptions, after: str | None) -> str:
    """Submit one stage as a submitit job (``afterok`` on ``after``); returns the Slurm job id."""
    executor = submitit.AutoExecutor(folder=Path(options.log_dir) / "%j", cluster="slurm",
                                     slurm_max_num_timeout=options.max_requeues)
    params = sbatch_options(options, recipe)
    if after:
        params["slurm_dependency"] = f"afterok:{after}"
    executor.update_parameters(name=f"{recipe.run.name}", **params)
    job = executor.submit(SlurmStage(recipe.to_dict(redact=False)))
    log.info("%s: submitted Slurm job %s%s (logs: %s)", stage, job.job_id, f" after {after}" if after else "",
             Path(options.log_dir) / job.job_id)
    return str(job.job_id)


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state of each job (``sacct``; a requeued job keeps its id), e.g. COMPLETED, RUNNING, PENDING."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60).stdout
    return {line.split("|")[0]: line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line}


class SlurmContext(TrainContext):
    """Stops every rank at the same step once any of them got the requeue signal."""

    requested = False

    def stop_requested(self) -> bool:
        flag = SlurmContext.requested
        if self.world_size > 1 and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


class SlurmStage:
    """The submitit callable: ``__call__`` trains; ``checkpoint`` (called by submitit on requeue) resubmits itself."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe

    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        recipe = from_dict(self.recipe)
        requeue = signal.getsignal(PREEMPT_SIGNAL)  # submitit's: calls checkpoint(), requeues, exits

        def request_stop(signum: int, frame: Any) -> None:
            log.warning("got %s: stopping at the next step to checkpoint and requeue", signal.Signals(signum).name)
            SlurmContext.requested = True

        signal.signal(PREEMPT_SIGNAL, request_stop)
        base = context_from_env(recipe)
        ctx = SlurmContext(**{f: getattr(base, f) for f in base.__dataclass_fields__})
        try:
            return train(recipe, ctx)
        except StopRequested:
            if ctx.is_main and callable(requeue):
                requeue(PREEMPT_SIGNAL, None)  # exits this process once the job is requeued
            sys.exit(-1)  # other ranks: the requeue ends the whole job
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """State lives in the run's checkpoints, so the requeued job is this same callable."""
        return submitit.helpers.DelayedSubmission(SlurmStage(self.recipe))
