"""Running a pipeline's stages: on Slurm (one job per stage, chained with ``afterok``), or one after
another in this process, inside one Ray job or as local runs. Complete stages are skipped."""

from __future__ import annotations

import logging
from typing import Any

from orchestrator import launch, pretrain, storage
from orchestrator import recipe as recipes
from orchestrator.errors import Interrupted
from orchestrator.launch import slurm_cluster
from orchestrator.pipeline.spec import Pipeline, Stage, read_state, record, stage_recipe
from orchestrator.preflight import preflight, world_sizes_for
from orchestrator.rundir import RunDir
from orchestrator.train import trackers

log = logging.getLogger(__name__)


def run_slurm(pipeline: Pipeline) -> list[str]:
    """Submit every incomplete stage, chained with afterok; a stage whose job is still queued or running is kept."""
    from orchestrator.launch import slurm

    todo = [s for s in pipeline.stages if not _skip_complete(pipeline, s)]
    if not todo:
        return []
    recipes_ = {}
    for s in todo:
        options = pipeline.slurm_of(s)
        recipes_[s.name] = recipes.absolute_paths(stage_recipe(pipeline, s, options.world_size,
                                                               gpus=options.gpus_per_node > 0))
        slurm_cluster.check_cluster(options, recipes_[s.name])
    for s in todo:
        produced_later = s.init_from in {t.name for t in todo}  # its init is made by a stage submitted now
        preflight(recipes_[s.name], f"{pipeline.path}: stage {s.name}",
                  world_sizes_for(recipes_[s.name], "slurm", pipeline.slurm_of(s)), check_init=not produced_later)
    state, submitted, after = read_state(pipeline), [], None
    parent = tracker_parent(pipeline, recipes_[todo[0].name])  # the stages' jobs end it (close_parent)
    for s in todo:
        if parent is not None:
            ends = ["failed", "finished"] if s is todo[-1] else ["failed"]
            trackers.set_parent(pipeline.run(s), {**parent, "job_type": s.name, "ends_parent_on": ends})
        jobs = state["stages"].get(s.name, {}).get("jobs", [])
        if jobs and slurm_cluster.job_states(jobs[-1:])[0].get(jobs[-1]) in slurm_cluster.LIVE:
            log.info("%s: Slurm job %s is still queued or running, kept", s.name, jobs[-1])
            after = jobs[-1]
            continue
        after = str(slurm.submit(pretrain.training(recipes_[s.name]), pipeline.slurm_of(s), after).job_id)
        record(pipeline, s, "slurm", after)
        submitted.append(after)
    return submitted


def run_in_process(pipeline: Pipeline, launcher: str) -> None:
    """Stages one after another in this process: inside one Ray job (``ray``) or as local runs (``local``)."""
    parent = None
    try:
        for s in pipeline.stages:
            if _skip_complete(pipeline, s):
                continue
            recipe = stage_recipe(pipeline, s)  # as orchestrator.pretrain would run it, under the same launcher
            preflight(recipe, f"{pipeline.path}: stage {s.name}", world_sizes_for(recipe, launcher))
            record(pipeline, s, launcher)
            parent = parent or tracker_parent(pipeline, recipe)
            if parent is not None:
                trackers.set_parent(pipeline.run(s), {**parent, "job_type": s.name})
            log.info("%s: running %s", s.name, pipeline.run(s).url)
            launch.run(pretrain.training(recipe), launcher)
    except BaseException as exc:
        if parent is not None:
            trackers.close_parent(recipe, parent, "stopped" if isinstance(exc, Interrupted | KeyboardInterrupt) else "failed")
        raise
    if parent is not None:
        trackers.close_parent(recipe, parent, "finished")


def tracker_parent(pipeline: Pipeline, recipe: recipes.Recipe) -> dict[str, Any] | None:
    """One parent tracker run per pipeline (its id under ``<storage>/_pipelines/<name>/``), a child per stage."""
    folder = RunDir(storage.join(pipeline.storage, "_pipelines", pipeline.name), pipeline.storage_options)
    return trackers.open_parent(recipe, folder, pipeline.name, "pipeline")


def _skip_complete(pipeline: Pipeline, stage: Stage) -> bool:
    run = pipeline.run(stage)
    if run.complete:
        log.info("%s: complete (%s has final weights), skipped", stage.name, run.url)
    return run.complete
