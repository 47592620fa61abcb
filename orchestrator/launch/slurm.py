"""Slurm through submitit: a job is one Slurm job, one task per GPU (or one CPU task per node); a pipeline
stage is one such job.

Every task runs the job's function; ``job.results()`` brings back each task's value (rank 0's is the job's).
A training run uses the same loop and checkpoint format as under every other launcher. On the requeue
signal (USR2: Slurm's ``--signal`` before the time limit, or a preemption) every rank stops at the
next step boundary, the loop saves a checkpoint of that step, and submitit requeues the job, which
resumes from it exactly. Before anything is submitted, the controller is pinged and the options are
checked with ``sbatch --test-only``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit

from orchestrator import logs, storage
from orchestrator.errors import OrchestratorError
from orchestrator.launch.distributed import end_process_group, rank_from_env
from orchestrator.launch.job import Job
from orchestrator.launch.slurm_cluster import check_cluster
from orchestrator.recipe import Recipe, from_dict, secrets_in_environment
from orchestrator.rundir import RunDir
from orchestrator.slurm_options import SlurmOptions, minutes
from orchestrator.train.context import Rank, StopRequested
from orchestrator.train.stop import StopSignals
from orchestrator.train.watchdog import exit_process

log = logging.getLogger(__name__)
PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's default requeue signal


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


def submit(job: Job, options: SlurmOptions, after: str | None = None) -> submitit.Job:
    """Submit ``job`` (``afterok`` on ``after``): one task per rank, each running the job's function."""
    executor = submitit.AutoExecutor(folder=Path(options.log_dir) / "%j", cluster="slurm",
                                     slurm_max_num_timeout=options.max_requeues)
    params = sbatch_options(options, job.recipe)
    if after:
        params["slurm_dependency"] = f"afterok:{after}"
    executor.update_parameters(name=job.cluster_name, **params)
    if job.setup is not None:
        job.setup()
    with secrets_in_environment(job.recipe):  # sbatch exports this process's environment (job.env is in it)
        submitted = executor.submit(SlurmRank(job))
    log.info("%s: submitted Slurm job %s%s (logs: %s)", job.cluster_name, submitted.job_id,
             f" after {after}" if after else "", Path(options.log_dir) / submitted.job_id)
    return submitted


def run(job: Job, options: SlurmOptions) -> Any:
    """``job`` as a Slurm job of ``options``' shape (the cluster checked first); waits for it, returns rank 0's
    value, or one line when it does not complete."""
    check_cluster(options, job.recipe)
    submitted = submit(job, options)
    try:
        return submitted.results()[0]
    except submitit.core.utils.UncompletedJobError as exc:
        raise OrchestratorError(f"Slurm job {submitted.job_id} ({job.cluster_name}) did not complete: "
                                f"{storage.one_line(exc)[:300]}") from None
    except submitit.core.utils.FailedJobError as exc:
        raise OrchestratorError(f"Slurm job {submitted.job_id} ({job.cluster_name}) failed: "
                                f"{storage.one_line(exc)[-300:]}") from None


def slurm_rank(recipe: Recipe) -> Rank:
    """Rank, world and rendezvous from the Slurm job (submitit's environment), as every task needs; a stall
    requeues the job (``requeue_on_stall``)."""
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["MASTER_ADDR"] = node_address(os.environ["MASTER_ADDR"])
    rank = rank_from_env(recipe, launcher="slurm")
    rank.on_stall = functools.partial(requeue_on_stall, RunDir.of(recipe), recipe.run.max_stall_restarts)
    return rank


def requeue_on_stall(run: RunDir, max_restarts: int, line: str) -> None:
    """The stall watchdog's end of a Slurm attempt: requeue the job, as a preempted one is (any rank may ask;
    Slurm ends every task of the job and runs it again, which resumes from the newest checkpoint), at most
    ``run.max_stall_restarts`` times a job: a hang that comes back on every attempt would otherwise loop until the
    allocation is gone. Each stall requeue leaves ``stalls/requeued-<job>-<attempt>`` (every rank of the attempt
    writes the same name); past the bound the job ends, its run marked stalled."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        exit_process(1)(line)
    try:
        done = len(run.fs.glob(f"{run.path}/stalls/requeued-{job}-*"))
    except Exception:  # noqa: BLE001 - the store may be what stalled: requeue as before
        done = 0
    if done >= max_restarts:
        with contextlib.suppress(Exception):
            run.write_status("stalled", error=f"stall {done + 1} of Slurm job {job}: not requeued "
                                              f"(run.max_stall_restarts={max_restarts})")
        exit_process(1)(f"{line}; Slurm job {job} not requeued: {done} stall requeue(s) already, "
                        f"run.max_stall_restarts={max_restarts}")
    with contextlib.suppress(Exception):
        run.write_bytes(f"stalls/requeued-{job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}", b"")
    subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=60)
    exit_process(1)(f"{line}; Slurm job {job} requeued ({done + 1} of run.max_stall_restarts={max_restarts})")


def preempted() -> bool:
    """Whether Slurm is preempting this job (its ``PreemptTime`` is set). A job that exits within
    ``GraceTime`` ends FAILED instead of being requeued, so the job requeues itself, as on USR2; a
    SIGTERM from ``scancel`` leaves no PreemptTime and ends the job."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"PreemptTime=(\S+)", out)
    return bool(m) and m.group(1) not in ("None", "Unknown")


def node_address(node: str) -> str:
    """Slurm's ``NodeAddr`` for ``node`` (the rendezvous host): clusters whose node names do not resolve set it."""
    out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else node


class SlurmRank:
    """The submitit callable: ``__call__`` runs the job's function on this task; ``checkpoint`` (called by submitit
    on requeue) resubmits itself.

    It holds the recipe with its secrets redacted (submitit pickles it onto the shared log folder);
    the secrets travel in the job's environment (``recipe.SECRETS_ENV``), which sbatch exports.
    """

    def __init__(self, job: Job) -> None:
        self.fn, self.recipe, self.args, self.resumable = job.fn, job.recipe.to_dict(redact=True), job.args, job.resumable

    def __call__(self) -> Any:
        logs.setup()
        recipe = from_dict(self.recipe)
        requeue = signal.getsignal(PREEMPT_SIGNAL)  # submitit's: calls checkpoint(), requeues, exits
        rank = slurm_rank(recipe)
        if self.resumable:
            # USR2 (time limit, or `scancel --signal=USR2`): checkpoint, then submitit requeues the job.
            # SIGTERM (PreemptMode=REQUEUE, before SIGKILL at GraceTime): checkpoint, then requeue as on USR2.
            # SIGTERM from scancel, or SIGINT: checkpoint and exit.
            rank.stop = StopSignals((PREEMPT_SIGNAL, signal.SIGTERM, signal.SIGINT)).install()
        try:
            return self.fn(recipe, rank, *self.args)
        except StopRequested as stop:
            received = rank.stop.received or PREEMPT_SIGNAL
            log.warning("stopped at step %s on %s; the requeued job resumes there", stop.step,
                        signal.Signals(received).name)
            if (received == PREEMPT_SIGNAL or preempted()) and rank.is_main and callable(requeue):
                requeue(PREEMPT_SIGNAL, None)  # checkpoint() and `scontrol requeue`; exits this process
            sys.exit(128 + received)  # other ranks (the requeue ends the whole job), or a plain scancel
        finally:
            rank.stop.restore()
            end_process_group()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """State lives in the run's checkpoints (a one-off job starts over), so the requeued job is this callable."""
        return submitit.helpers.DelayedSubmission(self)
