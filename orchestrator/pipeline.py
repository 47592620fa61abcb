"""``python -m orchestrator.pipeline PIPELINE --launcher slurm|ray|local [...]``: recipes run as stages.

A pipeline file (``recipes/pipelines/*.yaml``) lists stages in order, each a recipe with overrides,
a later one optionally initialised from an earlier one's result (``init_from``), plus the storage
all runs live in and default Slurm options. Every stage is an ordinary run
(``<storage>/<pipeline>-<stage>``), so the launchers can be mixed: a stage started under Slurm
resumes under Ray and the other way round. A stage is complete when its run has final weights;
re-submitting skips complete stages and resumes the others. ``--status`` reports each stage.

    python -m orchestrator.pipeline recipes/pipelines/b.yaml --launcher slurm --partition gpu \\
        --nodes 4 --gpus-per-node 8 --time 24:00:00
    ray job submit --working-dir . -- python -m orchestrator.pipeline recipes/pipelines/b.yaml --launcher ray
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import recipe as recipes
from orchestrator.cli import preflight
from orchestrator.data import storage
from orchestrator.errors import OrchestratorError, RecipeError
from orchestrator.launch.slurm import SlurmOptions, minutes
from orchestrator.train import checkpoint

log = logging.getLogger("orchestrator.pipeline")


@dataclass
class Stage:
    name: str
    recipe: str  # relative to the pipeline file
    set: dict[str, Any] = field(default_factory=dict)  # recipe overrides, {"section.key": value}
    init_from: str | None = None  # an earlier stage: model.init = its result (EMA weights first)


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]
    storage: str = "runs"
    storage_options: dict[str, Any] = field(default_factory=dict)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    path: Path = Path(".")
    overrides: list[str] = field(default_factory=list)  # --set, "[STAGE:]section.key=value"

    def run_name(self, stage: Stage) -> str:
        return f"{self.name}-{stage.name}"

    def run_url(self, stage: Stage) -> str:
        return storage.join(self.storage, self.run_name(stage))

    @property
    def state_url(self) -> str:
        return storage.join(self.storage, "_pipelines", f"{self.name}.json")


def load(path: str | Path, overrides: list[str] | None = None, slurm: dict[str, Any] | None = None,
         storage_url: str | None = None) -> Pipeline:
    """Read and check a pipeline file. ``overrides``: ``section.key=value`` (every stage) or
    ``STAGE:section.key=value``; ``slurm``: command-line Slurm options, which win over the file's."""
    path = Path(path)
    raw = recipes.read_mapping(path, "pipeline")
    known = {f.name for f in dataclasses.fields(Pipeline)} - {"path", "overrides"}
    if set(raw) - known:
        raise RecipeError(f"{path}: unknown key(s) {sorted(set(raw) - known)} (known: {', '.join(sorted(known))})")
    slurm_raw = {**(raw.get("slurm") or {}), **{k: v for k, v in (slurm or {}).items() if v is not None}}
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
    names = [s.name for s in stages]
    for s in stages:
        if names.count(s.name) > 1 or not s.name.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(f"{path}: stages: stage names must be unique words, got {s.name!r}")
        if s.init_from and s.init_from not in names[:names.index(s.name)]:
            raise RecipeError(f"{path}: stage {s.name}: init_from {s.init_from!r} is not an earlier stage")
    pipeline = Pipeline(name=raw.get("name", path.stem), stages=stages, storage=storage_url or raw.get("storage", "runs"),
                        storage_options=raw.get("storage_options") or {}, slurm=SlurmOptions(**slurm_raw), path=path,
                        overrides=list(overrides or []))
    minutes(pipeline.slurm.time)  # a malformed time fails here, not at submission
    for option in pipeline.overrides:
        target = option.split("=", 1)[0]
        if ":" in target and target.split(":", 1)[0] not in names:
            raise RecipeError(f"--set {option}: no stage {target.split(':', 1)[0]!r} (stages: {', '.join(names)})")
    for stage in stages:
        stage_recipe(pipeline, stage)  # every stage's recipe loads and validates now
    return pipeline


def stage_recipe(pipeline: Pipeline, stage: Stage, world_size: int | None = None, gpus: bool | None = None) -> recipes.Recipe:
    """The stage's recipe with its overrides, the pipeline's storage and run name; ``world_size`` and
    ``gpus`` replace the recipe's scaling when the launcher (Slurm) decides the shape."""
    split = [(o.split("=", 1)[0], o) for o in pipeline.overrides]
    mine = [o.split(":", 1)[1] for target, o in split if ":" in target and target.split(":", 1)[0] == stage.name]
    common = [o for target, o in split if ":" not in target]
    in_file = [f"{k}={json.dumps(v)}" for k, v in stage.set.items()]  # the command line wins over the file
    recipe = recipes.load(pipeline.path.parent / stage.recipe, in_file + common + mine)
    values: dict[str, Any] = {"run.name": pipeline.run_name(stage), "run.storage": pipeline.storage,
                              "run.storage_options": pipeline.storage_options}
    if world_size is not None:
        values["scaling.num_workers"] = world_size
    if gpus is not None:
        values["scaling.gpus_per_worker"] = 1 if gpus else 0
    if stage.init_from:
        values["model.init"] = pipeline.run_name(next(s for s in pipeline.stages if s.name == stage.init_from))
    return recipes.with_values(recipe, values, f"{pipeline.path}: stage {stage.name}")


def complete(pipeline: Pipeline, stage: Stage) -> bool:
    fs, path = storage.filesystem(pipeline.run_url(stage), pipeline.storage_options)
    return fs.exists(storage.join(path, "model.safetensors"))


# --- the state file: which jobs ran which stage ---------------------------------------------------
def read_state(pipeline: Pipeline) -> dict[str, Any]:
    fs, path = storage.filesystem(pipeline.state_url, pipeline.storage_options)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {"stages": {}}


def record(pipeline: Pipeline, stage: Stage, launcher: str, job: str | None = None) -> None:
    state = read_state(pipeline)
    entry = state["stages"].setdefault(stage.name, {"run": pipeline.run_url(stage), "jobs": []})
    entry["launcher"] = launcher
    if job:
        entry["jobs"].append(job)
    entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fs, path = storage.filesystem(pipeline.state_url, pipeline.storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(state, indent=2))


# --- launchers ----------------------------------------------------------------------------------
def run_slurm(pipeline: Pipeline) -> list[str]:
    """Submit every incomplete stage, chained with afterok; a stage whose job is still queued or running is kept."""
    from orchestrator.launch import slurm

    options = pipeline.slurm
    todo = [s for s in pipeline.stages if not complete(pipeline, s)]
    for s in pipeline.stages:
        if s not in todo:
            log.info("%s: complete (%s has final weights), skipped", s.name, pipeline.run_url(s))
    if not todo:
        return []
    recipes_ = {s.name: recipes.absolute_paths(stage_recipe(pipeline, s, options.world_size, gpus=options.gpus_per_node > 0))
                for s in todo}
    slurm.check_cluster(options, recipes_[todo[0].name])
    for s in todo:
        preflight(recipes_[s.name], f"{pipeline.path}: stage {s.name}", options.world_size, require_init=False)
    state, submitted, after = read_state(pipeline), [], None
    for s in todo:
        jobs = state["stages"].get(s.name, {}).get("jobs", [])
        live = jobs and slurm.job_states(jobs[-1:]).get(jobs[-1]) in ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD",
                                                                         "REQUEUE_FED", "RESIZING", "SUSPENDED")
        if live:
            log.info("%s: Slurm job %s is still queued or running, kept", s.name, jobs[-1])
            after = jobs[-1]
            continue
        after = slurm.submit(s.name, recipes_[s.name], options, after)
        record(pipeline, s, "slurm", after)
        submitted.append(after)
    return submitted


def run_in_process(pipeline: Pipeline, launcher: str) -> None:
    """Stages one after another in this process: inside one Ray job (``ray``) or as local runs (``local``)."""
    from orchestrator.cli import launch, world_size

    if launcher == "ray":
        from orchestrator.launch import ray_train

        ray_train.connect()
    for s in pipeline.stages:
        if complete(pipeline, s):
            log.info("%s: complete (%s has final weights), skipped", s.name, pipeline.run_url(s))
            continue
        recipe = stage_recipe(pipeline, s)  # as orchestrator.pretrain would run it, under the same launcher
        preflight(recipe, f"{pipeline.path}: stage {s.name}", world_size(recipe, launcher), require_init=False)
        record(pipeline, s, launcher)
        log.info("%s: running %s", s.name, pipeline.run_url(s))
        launch(recipe, launcher)


# --- status -------------------------------------------------------------------------------------
def status(pipeline: Pipeline) -> list[dict[str, Any]]:
    """Each stage: state, launcher, job ids, last epoch/step and metrics."""
    from orchestrator.launch.slurm import job_states

    state = read_state(pipeline)
    rows = []
    for s in pipeline.stages:
        entry = state["stages"].get(s.name, {})
        jobs = entry.get("jobs", [])
        last = _last_record(pipeline, s)
        newest = checkpoint.latest(storage.join(pipeline.run_url(s), "checkpoints"), pipeline.storage_options)
        if complete(pipeline, s):
            where = "complete"
        elif jobs:
            where = job_states(jobs[-1:]).get(jobs[-1], "unknown").lower()
        elif newest:
            where = "incomplete"
        else:
            where = "not started"
        metrics = {k: last[k] for k in ("top1", "ema_top1", "train_loss") if last.get(k) is not None}
        rows.append({"stage": s.name, "state": where, "launcher": entry.get("launcher", ""), "jobs": ",".join(jobs),
                     "epoch": last.get("epoch"), "step": last.get("step"), "metrics": metrics,
                     "run": pipeline.run_url(s)})
    return rows


def _last_record(pipeline: Pipeline, stage: Stage) -> dict[str, Any]:
    fs, path = storage.filesystem(storage.join(pipeline.run_url(stage), "metrics.jsonl"), pipeline.storage_options)
    if not fs.exists(path):
        return {}
    lines = [line for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    epochs = [json.loads(line) for line in lines if '"kind": "epoch"' in line or '"kind": "stop"' in line]
    return epochs[-1] if epochs else json.loads(lines[-1]) if lines else {}


def print_status(rows: list[dict[str, Any]]) -> None:
    header = f"{'stage':12s} {'state':12s} {'launcher':8s} {'jobs':16s} {'epoch':>5s} {'step':>8s}  metrics / run"
    print(header)
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items())
        print(f"{r['stage']:12s} {r['state']:12s} {r['launcher']:8s} {r['jobs'] or '-':16s} "
              f"{'-' if r['epoch'] is None else r['epoch']:>5} {'-' if r['step'] is None else r['step']:>8}  "
              f"{metrics + '  ' if metrics else ''}{r['run']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="orchestrator.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="pipeline YAML, e.g. recipes/pipelines/b.yaml")
    p.add_argument("--launcher", choices=("slurm", "ray", "local"), default="slurm")
    p.add_argument("--status", action="store_true", help="show each stage's state, jobs, last epoch/step and metrics")
    p.add_argument("--set", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                   help="recipe override for every stage, or for one with STAGE: in front")
    p.add_argument("--storage", help="where the stages' runs live, instead of the pipeline file's storage")
    slurm = p.add_argument_group("Slurm (default: the pipeline file's slurm section)")
    for flag, kind in [("partition", str), ("nodes", int), ("gpus-per-node", int), ("time", str), ("account", str),
                       ("qos", str), ("constraint", str), ("mem", str), ("cpus-per-gpu", int), ("exclude", str),
                       ("max-requeues", int), ("log-dir", str)]:
        slurm.add_argument(f"--{flag}", type=kind)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {k: getattr(args, k) for k in ("partition", "nodes", "gpus_per_node", "time", "account", "qos",
                                             "constraint", "mem", "cpus_per_gpu", "exclude", "max_requeues", "log_dir")}
    try:
        pipeline = load(args.pipeline, args.set, options, args.storage)
        if args.status:
            print_status(status(pipeline))
        elif args.launcher == "slurm":
            jobs = run_slurm(pipeline)
            print(f"submitted: {' '.join(jobs) if jobs else 'nothing (all stages complete or queued)'}")
        else:
            run_in_process(pipeline, args.launcher)
    except OrchestratorError as exc:
        print(f"error: {storage.redact(str(exc), {})}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
