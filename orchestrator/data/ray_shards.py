"""``data shard --launcher ray``: the shards of a conversion written by Ray tasks across the cluster (this driver's
cluster, or a local one it starts, as ``orchestrator.pretrain`` does), each task reading its images from the source
and uploading its shard straight to the destination. Ray retries a task whose worker died or whose storage call
failed transiently; the driver records each shard as its task returns, so a shard that still fails costs only
itself (``shard_writer``).

The source travels to the tasks through Ray's object store, which may spill to local disk: secrets therefore may not
be in ``--storage-option`` here (they are refused); a cluster's nodes take credentials from their environment or
instance profile, as boto3 and s3fs look for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from orchestrator import storage
from orchestrator.errors import RecipeError

RETRIES = 3  # per task, on a lost worker or a transient storage error


def check_options(options: dict[str, Any]) -> None:
    """Refuse inline secrets (before the cluster starts)."""
    if secrets := storage.secret_values(options):
        raise RecipeError(f"--launcher ray: --storage-option {', '.join(sorted(secrets))} would travel in the Ray tasks' "
                          "arguments; give the nodes credentials through their environment (AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY, a profile or an instance role) instead")


def finished(write: Callable[..., dict[str, Any]], work: dict[int, tuple[Any, ...]]) -> Iterator[tuple[int, Any]]:
    """``write(*args)`` for each shard index of ``work`` as a Ray task (one CPU each); yields ``(index, record)``
    as each task returns, or ``(index, exception)`` once its retries are spent."""
    import ray

    from orchestrator.launch.ray_train import connect

    connect()
    shared: dict[int, Any] = {}  # the source (the first argument) once in the object store, not once per task
    remote = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=list(storage.transient_errors()))(write)
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
