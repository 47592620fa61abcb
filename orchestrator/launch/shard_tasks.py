"""``data shard --launcher ray|slurm``: the shards of a conversion written across the cluster, each task reading its
images from the source and uploading its shard straight to the destination; the command records each shard as its
task returns, so a shard that fails costs only itself (``data.shard_writer``), and the same command redoes only
the unrecorded ones.

- Ray: a task per shard (one CPU) on this driver's cluster, or a local one it starts (as ``orchestrator.pretrain``
  does); Ray retries a task whose worker died or whose storage call failed transiently.
- Slurm: one array job through submitit, a task per shard (one CPU each); a task that fails is reported with the
  others, and the rerun submits only what is missing.

The source travels to the tasks pickled (Ray's object store, which may spill to disk; submitit's folder on the
shared file system), so secrets may not be in ``--storage-option`` here: they are refused. A cluster's nodes take
credentials from their environment or instance profile, as boto3 and s3fs look for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.errors import RecipeError
from orchestrator.slurm_options import SlurmOptions, minutes

RAY_RETRIES = 3  # per task, on a lost worker or a transient storage error
Write = Callable[..., dict[str, Any]]


def check_options(options: dict[str, Any], launcher: str) -> None:
    """Refuse inline secrets (before any cluster starts)."""
    if secrets := storage.secret_values(options):
        raise RecipeError(f"--launcher {launcher}: --storage-option {', '.join(sorted(secrets))} would travel in the "
                          "tasks' pickled arguments; give the nodes credentials through their environment "
                          "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, a profile or an instance role) instead")


def on_ray(write: Write, work: dict[int, tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
    """``write(*args)`` for each shard index of ``work`` as a Ray task; ``(index, record)`` as each returns, or
    ``(index, exception)`` once its retries are spent."""
    import ray

    from orchestrator.launch.ray_train import connect

    connect()
    shared: dict[int, Any] = {}  # the source (the first argument) once in the object store, not once per task
    remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES, retry_exceptions=list(storage.transient_errors()))(write)
    pending = {}
    for index, (source, *rest) in work.items():
        ref = shared.setdefault(id(source), ray.put(source))
        pending[remote.remote(ref, *rest)] = index
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        try:
            yield index, ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:  # the task's own exception, as the local path reports it
            yield index, exc.cause if isinstance(exc.cause, Exception) else exc
        except ray.exceptions.RayError as exc:  # a worker or node lost past its retries
            yield index, exc


def on_slurm(options: SlurmOptions) -> Callable[[Write, dict[int, tuple[Any, ...]]], Iterator[tuple[int, Any]]]:
    """The shard tasks as one Slurm array job of ``options`` (its partition, time, account...; one CPU a task)."""

    def finished(write: Write, work: dict[int, tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
        import submitit

        executor = submitit.AutoExecutor(folder=Path(options.log_dir) / "%j", cluster="slurm")
        executor.update_parameters(name="inceptionnext-shard", nodes=1, tasks_per_node=1, cpus_per_task=1,
                                   timeout_min=minutes(options.time),
                                   **{f"slurm_{k}": v for k, v in options.optional().items()},
                                   **({"slurm_additional_parameters": dict(options.extra)} if options.extra else {}))
        indices = list(work)
        with executor.batch():
            jobs = [executor.submit(write, *work[i]) for i in indices]
        index = {job.job_id: i for job, i in zip(jobs, indices, strict=True)}
        for job in submitit.helpers.as_completed(jobs, poll_frequency=2):
            try:
                yield index[job.job_id], job.result()
            except Exception as exc:  # noqa: BLE001 - reported with the other shards' failures
                yield index[job.job_id], RuntimeError(f"Slurm task {job.job_id}: {_task_error(exc)}")

    return finished


def _task_error(exc: Exception) -> str:
    """The last line of the task's traceback in submitit's error (which goes on to name the log files)."""
    parts = str(exc).split("-" * 22)
    lines = [line.strip() for line in (parts[1] if len(parts) >= 3 else str(exc)).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
