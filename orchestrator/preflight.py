"""Before a job starts: the world sizes a launcher gives it, and every check that needs them or storage.

Used by every entry point (pretrain/finetune/segment, pipelines, sweeps, the doctor, evaluate), so the world
size is decided here only.
"""

from __future__ import annotations

import importlib.util
import os

from orchestrator import storage, weight_lookup
from orchestrator.data import manifest
from orchestrator.data.reader import checked_order, select_groups
from orchestrator.errors import OrchestratorError, RecipeError
from orchestrator.recipe import Recipe, micro_batch, plan_batch, world_sizes
from orchestrator.rundir import RunDir
from orchestrator.slurm_options import SlurmOptions


def world_sizes_for(recipe: Recipe, where: str, slurm: SlurmOptions | None = None) -> list[int]:
    """The world sizes a job of ``recipe`` may have under ``where``. Ray: ``scaling.num_workers`` (every size of an
    elastic ``[min, max]``); local: torchrun's ``WORLD_SIZE`` (1 without torchrun); Slurm: the job's tasks."""
    if where == "local":
        return [int(os.environ.get("WORLD_SIZE", 1))]
    if where == "slurm":
        return [(slurm or SlurmOptions()).world_size]
    return world_sizes(recipe)


def preflight(recipe: Recipe, source: str, world: int | list[int], require_init: bool = False,
              check_init: bool = True) -> None:
    """Every check that needs the launch plan or storage, before any process group or cluster starts:
    the batch plan and sample order on each world size, the run storage, the datasets and ``model.init``
    (unless ``check_init`` is off: an earlier pipeline stage will produce it). Each failure is one line."""
    worlds = world if isinstance(world, list) else [world]
    for w in worlds:
        plan_batch(recipe, w, f"{source} (on {w} device(s))")
    if require_init and not recipe.model.init:
        raise RecipeError(f"{source}: model.init: fine-tuning needs a run name or checkpoint URL to start from")
    storage.check_reachable(recipe.run.storage, recipe.run.storage_options, "run.storage", "run.storage_options")
    for name in recipe.run.trackers:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise RecipeError(f"{source}: run.trackers: {name} is not installed here "
                              "(pip install 'inceptionnext-orchestrator[trackers]')")
    for key in ("train", "val"):
        url = getattr(recipe.data, key)
        if url:
            storage.check_reachable(url, recipe.data.storage_options, f"data.{key}", "data.storage_options")
            try:
                found = manifest.load(url, recipe.data.storage_options)
            except OrchestratorError as exc:
                raise RecipeError(f"{source}: data.{key}={url}: {exc}") from exc
            check_task(recipe, found, f"{source}: data.{key}={url}")
            if key == "train":
                try:
                    checked_order(select_groups(found, recipe.data.train_fraction), micro_batch(recipe),
                                  recipe.batch.global_batch_size, recipe.data.partitions, worlds, f"data.train={url}")
                except OrchestratorError as exc:
                    raise RecipeError(f"{source}: {exc}") from exc
    if recipe.data.decode == "gpu":  # every RandAugment op must have a device version (torchvision: imported only now)
        from orchestrator.data.gpu_decode import TrainDraws

        try:
            TrainDraws(recipe.data.input_size, recipe.augment.auto_augment, recipe.data.train_interpolation)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from exc
    if recipe.model.init and check_init:
        try:
            weight_lookup.resolve_init(recipe.model.init, recipe.run.storage, recipe.run.storage_options)
        except OrchestratorError as exc:
            raise RecipeError(f"{source}: {exc}") from exc


def check_task(recipe: Recipe, found: manifest.Manifest, where: str) -> None:
    """The dataset is of the recipe's task, and a segmentation head has one output per class of the dataset."""
    if found.task != recipe.task:
        hint = " (shard it with --task segmentation)" if recipe.task == "segmentation" else ""
        raise RecipeError(f"{where}: holds {found.task} shards, the recipe's task is {recipe.task}{hint}")
    if recipe.task == "segmentation" and found.classes and len(found.classes) != recipe.model.num_classes:
        raise RecipeError(f"{where}: the dataset has {len(found.classes)} classes, model.num_classes is "
                          f"{recipe.model.num_classes}")


def finished(recipe: Recipe) -> str | None:
    """Why running ``recipe`` has nothing to do, or None: its run is complete (final weights) and did its whole
    schedule, or all of a ``run.max_steps`` no larger than before. A finished run is never rewritten."""
    run = RunDir.of(recipe)
    if not run.complete:
        return None
    status = run.status()
    step, schedule = status.get("step") or 0, status.get("schedule_steps") or 0
    if step < schedule and (recipe.run.max_steps is None or step < recipe.run.max_steps):
        return None  # it stopped at an earlier run.max_steps: a larger one continues it
    return (f"{run.url} is finished (step {step}, weights {run.final_weights()}); nothing to do. --fresh starts it "
            "over (the old run is kept beside it), or --set run.name=NEW trains another")
