"""Pipeline files (``recipes/pipelines/*.yaml``): stages in order, each a recipe with overrides, a
later one optionally initialised from an earlier one's result (``init_from``), the storage all runs
live in and default Slurm options. Validated in full at load (every stage's recipe too).

Every stage is an ordinary run (``<storage>/<pipeline>-<stage>``), so launchers can be mixed. A
stage is complete when its run has final weights. The state file
``<storage>/_pipelines/<name>.json`` records which launcher and Slurm jobs ran each stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import overrides as overrides_
from orchestrator import recipe as recipes
from orchestrator import storage
from orchestrator.errors import RecipeError
from orchestrator.overrides import Override
from orchestrator.rundir import RunDir
from orchestrator.slurm_options import SlurmOptions, minutes


@dataclass
class Stage:
    name: str
    recipe: str  # relative to the pipeline file
    set: dict[str, Any] = field(default_factory=dict)  # recipe overrides, {"section.key": value}
    init_from: str | None = None  # an earlier stage: model.init = its result (EMA weights first)
    slurm: dict[str, Any] = field(default_factory=dict)  # this stage's Slurm options over the pipeline's (nodes: 1)


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]
    storage: str = "runs"
    storage_options: dict[str, Any] = field(default_factory=dict)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    path: Path = Path(".")
    overrides: list[Override] = field(default_factory=list)  # --set, [STAGE:]section.key=value
    stage_slurm: dict[str, SlurmOptions] = field(default_factory=dict)  # stages with their own slurm: options

    def slurm_of(self, stage: Stage) -> SlurmOptions:
        """The stage's Slurm options: the file's, then the stage's own, then the command line's."""
        return self.stage_slurm.get(stage.name, self.slurm)

    def run_name(self, stage: Stage) -> str:
        return f"{self.name}-{stage.name}"

    def run(self, stage: Stage) -> RunDir:
        return RunDir.under(self.storage, self.run_name(stage), self.storage_options)

    @property
    def state_url(self) -> str:
        return storage.join(self.storage, "_pipelines", f"{self.name}.json")


def load(path: str | Path, overrides: list[str | Override] | None = None, slurm: dict[str, Any] | None = None,
         storage_url: str | None = None) -> Pipeline:
    """Read and check a pipeline file. ``overrides``: ``section.key=value`` (every stage) or
    ``STAGE:section.key=value``; ``slurm``: command-line Slurm options, which win over the file's."""
    path = Path(path)
    raw = recipes.read_mapping(path, "pipeline")
    known = {f.name for f in dataclasses.fields(Pipeline)} - {"path", "overrides", "stage_slurm"}
    if set(raw) - known:
        raise RecipeError(f"{path}: unknown key(s) {sorted(set(raw) - known)} (known: {', '.join(sorted(known))})")
    cli_slurm = {k: v for k, v in (slurm or {}).items() if v is not None}
    slurm_raw = {**(raw.get("slurm") or {}), **cli_slurm}
    slurm_fields = {f.name for f in dataclasses.fields(SlurmOptions)}
    if set(slurm_raw) - slurm_fields:
        raise RecipeError(f"{path}: slurm: unknown option(s) {sorted(set(slurm_raw) - slurm_fields)}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{path}: stages: expected a non-empty list of {{name, recipe, set, init_from}}")
    stages = []
    for i, s in enumerate(stages_raw):
        if not isinstance(s, dict) or set(s) - {f.name for f in dataclasses.fields(Stage)} or not {"name", "recipe"} <= set(s):
            raise RecipeError(f"{path}: stages[{i}]: expected {{name, recipe, set, init_from}}, got {s!r}")
        stages.append(Stage(**s))
        if not isinstance(stages[-1].slurm, dict) or set(stages[-1].slurm) - slurm_fields:
            raise RecipeError(f"{path}: stages[{i}].slurm: expected Slurm options ({', '.join(sorted(slurm_fields))}), "
                              f"got {stages[-1].slurm!r}")
    names = [s.name for s in stages]
    for s in stages:
        if names.count(s.name) > 1 or not s.name.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(f"{path}: stages: stage names must be unique words, got {s.name!r}")
        if s.init_from and s.init_from not in names[:names.index(s.name)]:
            raise RecipeError(f"{path}: stage {s.name}: init_from {s.init_from!r} is not an earlier stage")
    parsed = overrides_.parse(overrides or [])
    options = dict(raw.get("storage_options") or {})  # --set run.storage_options=... adds to the file's
    for o in parsed:
        if o.key == "run.storage_options" and not o.scope and isinstance(o.value, dict):
            options |= o.value
    storage.remember_secrets(options)
    pipeline = Pipeline(name=raw.get("name", path.stem), stages=stages, storage=storage_url or raw.get("storage", "runs"),
                        storage_options=options, slurm=SlurmOptions(**slurm_raw), path=path, overrides=parsed,
                        stage_slurm={s.name: SlurmOptions(**{**(raw.get("slurm") or {}), **s.slurm, **cli_slurm})
                                     for s in stages if s.slurm})
    for options_ in [pipeline.slurm, *pipeline.stage_slurm.values()]:
        minutes(options_.time)  # a malformed time fails here, not at submission
    for o in pipeline.overrides:
        if o.scope and o.scope not in names:
            raise RecipeError(f"{o.origin} {o.scope}:{o.key}: no stage {o.scope!r} (stages: {', '.join(names)})")
    for stage in stages:
        stage_recipe(pipeline, stage)  # every stage's recipe loads and validates now
    return pipeline


def stage_recipe(pipeline: Pipeline, stage: Stage, world_size: int | None = None, gpus: bool | None = None) -> recipes.Recipe:
    """The stage's recipe with its overrides, the pipeline's storage and run name; ``world_size`` and
    ``gpus`` replace the recipe's scaling when the launcher (Slurm) decides the shape."""
    in_file = overrides_.from_mapping(stage.set, f"{pipeline.path}: stage {stage.name}: set")
    mine = [dataclasses.replace(o, scope=None) for o in pipeline.overrides if o.scope in (None, stage.name)]
    path = pipeline.path.parent / stage.recipe
    if not path.is_file():
        raise RecipeError(f"{pipeline.path}: stage {stage.name}: recipe {stage.recipe}: recipe file not found ({path})")
    recipe = recipes.load(path, in_file + mine)  # the command line wins over the file
    values: dict[str, Any] = {"run.name": pipeline.run_name(stage), "run.storage": pipeline.storage,
                              "run.storage_options": pipeline.storage_options}
    if world_size is not None:
        values["scaling.num_workers"] = world_size
    if gpus is not None:
        values["scaling.gpus_per_worker"] = 1 if gpus else 0
    if stage.init_from:
        values["model.init"] = pipeline.run_name(next(s for s in pipeline.stages if s.name == stage.init_from))
    return recipes.with_values(recipe, values, f"{pipeline.path}: stage {stage.name}")


# --- the state file: which jobs ran which stage ---------------------------------------------------
def read_state(pipeline: Pipeline) -> dict[str, Any]:
    fs, path = storage.filesystem(pipeline.state_url, pipeline.storage_options)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {"stages": {}}


def record(pipeline: Pipeline, stage: Stage, launcher: str, job: str | None = None) -> None:
    state = read_state(pipeline)
    entry = state["stages"].setdefault(stage.name, {"run": pipeline.run(stage).url, "jobs": []})
    entry["launcher"] = launcher
    if job:
        entry["jobs"].append(job)
    entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fs, path = storage.filesystem(pipeline.state_url, pipeline.storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(state, indent=2))
