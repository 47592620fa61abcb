"""Slurm through submitit: each pipeline stage is one job, one task per GPU (or one CPU task per node).

The job runs the same training loop and checkpoint format as every other launcher. On the requeue
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
import torch.distributed as dist

from orchestrator import logs
from orchestrator.cli import one_line
from orchestrator.errors import OrchestratorError
from orchestrator.launch.distributed import context_from_env
from orchestrator.launch.slurm_cluster import SlurmOptions, minutes
from orchestrator.recipe import Recipe, from_dict, secrets_in_environment
from orchestrator.rundir import RunDir
from orchestrator.train.context import StopRequested, TrainContext
from orchestrator.train.loop import train
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


def submit(stage: str, recipe: Recipe, options: SlurmOptions, after: str | None) -> str:
    """Submit one stage as a submitit job (``afterok`` on ``after``); returns the Slurm job id."""
    job = _submit(SlurmStage(recipe.to_dict(redact=True)), recipe.run.name, recipe, options, after)
    log.info("%s: submitted Slurm job %s%s (logs: %s)", stage, job.job_id, f" after {after}" if after else "",
             Path(options.log_dir) / job.job_id)
    return str(job.job_id)


def _submit(fn: Any, name: str, recipe: Recipe, options: SlurmOptions, after: str | None = None) -> submitit.Job:
    executor = submitit.AutoExecutor(folder=Path(options.log_dir) / "%j", cluster="slurm",
                                     slurm_max_num_timeout=options.max_requeues)
    params = sbatch_options(options, recipe)
    if after:
        params["slurm_dependency"] = f"afterok:{after}"
    executor.update_parameters(name=name, **params)
    with secrets_in_environment(recipe):  # sbatch exports this process's environment to the job
        return executor.submit(fn)


def probe(recipe: Recipe, options: SlurmOptions, stamp: str, seconds: float) -> None:
    """``orchestrator.doctor`` as a Slurm job of the stage's shape; waits for it (a few minutes at most)."""
    run_and_wait(SlurmProbe(recipe.to_dict(redact=True), stamp, seconds), "doctor", recipe, options)


def evaluate(recipe: Recipe, options: SlurmOptions, job: dict[str, Any]) -> None:
    """``orchestrator.evaluate`` as a Slurm job of ``options``' shape; rank 0 saves the result."""
    run_and_wait(SlurmEvaluate(recipe.to_dict(redact=True), job), "evaluate", recipe, options)


def run_and_wait(fn: Any, what: str, recipe: Recipe, options: SlurmOptions) -> None:
    """Submit ``fn`` (every task runs it) and wait for the job; one line when it does not complete."""
    job = _submit(fn, f"{what}-{recipe.run.name}", recipe, options)
    log.info("%s: Slurm job %s (logs: %s)", what, job.job_id, Path(options.log_dir) / job.job_id)
    try:
        job.results()
    except submitit.core.utils.UncompletedJobError as exc:
        raise OrchestratorError(f"the {what} Slurm job {job.job_id} did not complete: {one_line(exc)[:300]}") from None
    except submitit.core.utils.FailedJobError as exc:
        raise OrchestratorError(f"the {what} Slurm job {job.job_id} failed: {one_line(exc)[-300:]}") from None


def distributed_context(recipe: Recipe) -> TrainContext:
    """Rank, world and rendezvous from the Slurm job (submitit's environment), as every job task needs; a
    stall requeues the job (``requeue_on_stall``)."""
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["MASTER_ADDR"] = node_address(os.environ["MASTER_ADDR"])
    ctx = context_from_env(recipe, launcher="slurm")
    ctx.on_stall = functools.partial(requeue_on_stall, ctx.run, recipe.run.max_stall_restarts)  # type: ignore[method-assign]
    return ctx


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


class SlurmEvaluate:
    """The submitit callable of ``orchestrator.evaluate``: every task evaluates its share; rank 0 saves."""

    def __init__(self, recipe: dict[str, Any], job: dict[str, Any]) -> None:
        self.recipe, self.job = recipe, job

    def __call__(self) -> None:
        from orchestrator import evaluate as evaluation

        logs.setup()
        recipe = from_dict(self.recipe)
        ctx = distributed_context(recipe)
        try:
            evaluation.on_rank(evaluation.Job(**self.job), recipe, ctx)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class SlurmProbe:
    """The submitit callable of ``orchestrator.doctor``: every task measures; rank 0 saves the figures."""

    def __init__(self, recipe: dict[str, Any], stamp: str, seconds: float) -> None:
        self.recipe, self.stamp, self.seconds = recipe, stamp, seconds

    def __call__(self) -> None:
        from orchestrator import doctor

        logs.setup()
        recipe = from_dict(self.recipe)
        ctx = distributed_context(recipe)
        try:
            doctor.probe_and_save(recipe, ctx, self.stamp, self.seconds)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


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


class SlurmStage:
    """The submitit callable: ``__call__`` trains; ``checkpoint`` (called by submitit on requeue) resubmits itself.

    It holds the recipe with its secrets redacted (submitit pickles it onto the shared log folder);
    the secrets travel in the job's environment (``recipe.SECRETS_ENV``), which sbatch exports.
    """

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe

    def __call__(self) -> dict[str, Any]:
        logs.setup()
        recipe = from_dict(self.recipe)
        requeue = signal.getsignal(PREEMPT_SIGNAL)  # submitit's: calls checkpoint(), requeues, exits
        ctx = distributed_context(recipe)
        # USR2 (time limit, or `scancel --signal=USR2`): checkpoint, then submitit requeues the job.
        # SIGTERM (PreemptMode=REQUEUE, before SIGKILL at GraceTime): checkpoint, then requeue as on USR2.
        # SIGTERM from scancel, or SIGINT: checkpoint and exit.
        ctx.stop = StopSignals((PREEMPT_SIGNAL, signal.SIGTERM, signal.SIGINT)).install()
        try:
            return train(recipe, ctx)
        except StopRequested as stop:
            received = ctx.stop.received or PREEMPT_SIGNAL
            log.warning("stopped at step %s on %s; the requeued job resumes there", stop.args[0],
                        signal.Signals(received).name)
            if (received == PREEMPT_SIGNAL or preempted()) and ctx.is_main and callable(requeue):
                requeue(PREEMPT_SIGNAL, None)  # checkpoint() and `scontrol requeue`; exits this process
            sys.exit(128 + received)  # other ranks (the requeue ends the whole job), or a plain scancel
        finally:
            ctx.stop.restore()
            if dist.is_initialized():
                dist.destroy_process_group()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """State lives in the run's checkpoints, so the requeued job is this same callable."""
        return submitit.helpers.DelayedSubmission(SlurmStage(self.recipe))
