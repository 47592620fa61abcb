"""Slurm's queue without torch or submitit: the cluster checks before submission, job states.

``--status`` and the submission checks use only this module, so they start in a blink.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from orchestrator.errors import RecipeError
from orchestrator.recipe import Recipe
from orchestrator.slurm_options import SlurmOptions

# States in which a job still holds (or will hold) its stage: re-submitting keeps it.
LIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "CONFIGURING",
        "COMPLETING")


def check_cluster(options: SlurmOptions, recipe: Recipe) -> None:
    """Controller reachable and options accepted (``sbatch --test-only``), or a RecipeError naming the problem."""
    for tool in ("sbatch", "scontrol"):
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


def job_states(job_ids: list[str]) -> tuple[dict[str, str], str]:
    """Slurm state of each job (e.g. COMPLETED, RUNNING, PENDING) and where it came from.

    ``sacct`` knows finished jobs too, but only where accounting is on; without it, ``squeue`` (queued
    and running jobs) and then ``scontrol show job`` (jobs the controller still remembers) answer.
    """
    if not job_ids:
        return {}, "sacct"
    if shutil.which("sacct"):
        done = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return {line.split("|")[0]: line.split("|")[1].split()[0]
                    for line in done.stdout.splitlines() if "|" in line}, "sacct"
    states: dict[str, str] = {}
    if shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True, text=True,
                             timeout=60).stdout
        states = {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line}
    for job in job_ids:
        if job not in states and shutil.which("scontrol"):
            out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
            m = re.search(r"JobState=(\S+)", out)
            if m:
                states[job] = m.group(1)
    return states, "squeue/scontrol (no accounting: sacct is not available)"
