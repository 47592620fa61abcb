"""Ray Train (V2) launcher: the training loop in a TorchTrainer, checkpoints reported to Ray.

Checkpoints keep the loop's own format and land where every launcher looks for them
(``<storage>/<run>/checkpoints/step-N/``), so a run can move between Ray, Slurm and local.
Re-running with the same ``run.name`` and ``run.storage`` resumes; ``--fresh`` starts over.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.data import storage
from orchestrator.errors import RecipeError
from orchestrator.launch import faults
from orchestrator.recipe import Recipe, absolute_paths, from_dict
from orchestrator.train import checkpoint
from orchestrator.train.context import TrainContext
from orchestrator.train.loop import train

log = logging.getLogger(__name__)


class RayContext(TrainContext):
    """Rank and device from Ray Train; checkpoints go through ``ray.train.report``."""

    def save_checkpoint(self, step: int, write: Callable[[str], None], metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            if self.is_main:
                write(tmp)
            ray.train.report(_plain(metrics), checkpoint=Checkpoint.from_directory(tmp) if self.is_main else None,
                             checkpoint_dir_name=f"checkpoints/step-{step:08d}")
        faults.maybe_fail(step, self.rank)

    def report(self, metrics: dict[str, Any]) -> None:
        """Epoch metrics were reported with the checkpoint already."""


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}


def worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: rebuild the recipe, make the context, train."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faults.configure(config.get("fault"))
    recipe = from_dict(config["recipe"])
    tctx = ray.train.get_context()
    device = ray.train.torch.get_device() if recipe.scaling.gpus_per_worker > 0 else torch.device("cpu")
    ctx = RayContext(run_dir=storage.join(recipe.run.storage, recipe.run.name), rank=tctx.get_world_rank(),
                     world_size=tctx.get_world_size(), local_rank=tctx.get_local_rank(), device=device,
                     storage_options=recipe.run.storage_options, keep_checkpoints=recipe.run.keep_checkpoints)
    train(recipe, ctx)


def storage_for_ray(url: str, options: dict[str, Any]) -> tuple[str, pafs.FileSystem | None]:
    """Ray's ``storage_path``/``storage_filesystem`` for a URL (fsspec-backed, so endpoints and credentials apply)."""
    fs, path = storage.filesystem(url, options)
    if storage.is_local(fs):
        return os.path.abspath(path), None
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def connect(include_dashboard: bool = False) -> None:
    """Attach to the cluster of this Ray job (or ``RAY_ADDRESS``); otherwise start a local one on 127.0.0.1.

    Tune sweeps want the dashboard: without it, stopped trials kept their placement groups (Ray 2.60).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=include_dashboard)


def _job_working_dir() -> str | None:
    """The uploaded ``--working-dir`` of the Ray job this driver runs in, if any (a temporary copy)."""
    return (ray.get_runtime_context().runtime_env or {}).get("working_dir")


def check_storage(url: str, key: str = "run.storage") -> None:
    """Inside ``ray job submit --working-dir`` a relative local path points into the job's temporary
    copy of the project and vanishes with it: refuse it, naming the key."""
    if _job_working_dir() and storage.is_local(storage.filesystem(url)[0]) and not os.path.isabs(url.removeprefix("file://")):
        raise RecipeError(f"{key}={url!r} is relative, which inside a Ray job means the job's temporary copy of "
                          "--working-dir; give an absolute path on shared disk or an s3:// / gs:// URL")


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """Workers run elsewhere (another cwd, maybe another node): local paths are made absolute here."""
    check_storage(recipe.run.storage)
    return absolute_paths(recipe)


def trainer(recipe: Recipe, callbacks: list[ray.train.UserCallback] | None = None) -> TorchTrainer:
    """A TorchTrainer for ``recipe`` (paths already absolute): workers and resources from ``scaling``."""
    s = recipe.scaling
    storage_path, filesystem = storage_for_ray(recipe.run.storage, recipe.run.storage_options)
    gpus = {"GPU": s.gpus_per_worker} if s.gpus_per_worker else {}
    return TorchTrainer(
        worker,
        train_loop_config={"recipe": recipe.to_dict(redact=False), "fault": os.environ.get(faults.ENV)},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": s.cpus_per_worker, **gpus}),
        run_config=RunConfig(name=recipe.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=recipe.run.keep_checkpoints),
                             callbacks=callbacks),
    )


def run(recipe: Recipe, fresh: bool = False) -> dict[str, Any]:
    connect()
    recipe = with_absolute_paths(recipe)
    if fresh:
        checkpoint.set_aside(storage.join(recipe.run.storage, recipe.run.name), recipe.run.storage_options)
    result = trainer(recipe).fit()
    if result.error:
        raise result.error
    return dict(result.metrics or {})
