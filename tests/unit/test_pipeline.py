"""Pipeline files: stages, overrides and Slurm options are checked before anything is submitted."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import recipe as recipes
from orchestrator.errors import RecipeError
from orchestrator.launch.slurm import sbatch_options
from orchestrator.pipeline import spec as pipelines
from orchestrator.slurm_options import minutes
from tests.conftest import ROOT

PIPELINES = ROOT / "recipes" / "pipelines"


@pytest.mark.parametrize("name", ["smoke", "b", "t", "smoke_ade20k", "t_ade20k", "s_ade20k", "b_ade20k"])
def test_shipped_pipelines_load_and_chain_the_fine_tune_to_the_pretraining(name: str) -> None:
    p = pipelines.load(PIPELINES / f"{name}.yaml")
    first, second = p.stages
    assert second.init_from == first.name
    assert pipelines.stage_recipe(p, second).model.init == p.run_name(first)


def test_b_pipeline_is_the_paper_recipe_on_32_gpus() -> None:
    p = pipelines.load(PIPELINES / "b.yaml")
    pre = pipelines.stage_recipe(p, p.stages[0], p.slurm.world_size, gpus=True)
    tune = pipelines.stage_recipe(p, p.stages[1], p.slurm.world_size, gpus=True)
    assert p.slurm.world_size == 32 and pre.scaling.gpus_per_worker == 1
    assert (pre.batch.global_batch_size, pre.schedule.epochs, tune.data.input_size, tune.ema.decay) == (4096, 300, 384, 0.9999)
    params = sbatch_options(p.slurm, pre)
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"], params["timeout_min"]) == (4, 8, 8, 1440)


@pytest.mark.parametrize("size", ["t", "s", "b"])
def test_ade20k_pipelines_segment_on_one_node_after_pretraining_on_four(size: str) -> None:
    """The UperNet stage has its own Slurm shape (8 GPUs: the Swin config's 8 x 2 images); the command line wins."""
    p = pipelines.load(PIPELINES / f"{size}_ade20k.yaml")
    pre, seg = p.stages
    assert (p.slurm_of(pre).world_size, p.slurm_of(seg).world_size, p.slurm_of(seg).time) == (32, 8, "48:00:00")
    recipe = pipelines.stage_recipe(p, seg, p.slurm_of(seg).world_size, gpus=True)
    assert recipe.task == "segmentation" and recipe.model.init == p.run_name(pre) and recipe.head.name == "upernet"
    assert recipes.plan_batch(recipe, 8).accum_steps == 1
    assert pipelines.load(PIPELINES / f"{size}_ade20k.yaml", slurm={"nodes": 2}).slurm_of(seg).nodes == 2


def test_command_line_overrides_win_over_the_file_and_can_name_a_stage() -> None:
    p = pipelines.load(PIPELINES / "smoke.yaml", ["optimizer.lr=1e-3", "finetune:schedule.epochs=3"])
    pre, tune = (pipelines.stage_recipe(p, s) for s in p.stages)
    assert pre.optimizer.lr == tune.optimizer.lr == 1e-3
    assert pre.schedule.epochs == 4 and tune.schedule.epochs == 3  # the file says 4 and 1


@pytest.mark.parametrize(("text", "message"), [
    ("stages: []", "stages: expected a non-empty list"),
    ("colour: red\nstages: [{name: a, recipe: R/smoke.yaml}]", "unknown key(s) ['colour']"),
    ("stages: [{name: a, recipe: R/smoke.yaml, init_from: b}, {name: b, recipe: R/smoke.yaml}]",
     "init_from 'b' is not an earlier stage"),
    ("stages: [{name: a, recipe: R/smoke.yaml}, {name: a, recipe: R/smoke.yaml}]", "stage names must be unique"),
    ("stages: [{name: a, recipe: R/smoke.yaml}, {name: ft, recipe: nope.yaml}]",
     "pipeline.yaml: stage ft: recipe nope.yaml: recipe file not found"),
    ("stages: [{name: a, recipe: R/smoke.yaml, set: {model.drop_path_rate: 2}}]", "model.drop_path_rate: 2"),
    ("slurm: {gpus: 8}\nstages: [{name: a, recipe: R/smoke.yaml}]", "slurm: unknown option(s) ['gpus']"),
    ("slurm: {time: soon}\nstages: [{name: a, recipe: R/smoke.yaml}]", "slurm time 'soon'"),
    ("stages: [{name: a, recipe: R/smoke.yaml, slurm: {gpu: 1}}]", "stages[0].slurm: expected Slurm options"),
    ("stages: [{name: a, recipe: R/smoke.yaml, slurm: {time: later}}]", "slurm time 'later'"),
])
def test_bad_pipelines_name_the_problem(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.replace("R/", f"{ROOT}/recipes/"))
    with pytest.raises(RecipeError) as err:
        pipelines.load(path)
    assert message in str(err.value)


def test_an_override_for_an_unknown_stage_is_refused() -> None:
    with pytest.raises(RecipeError, match="no stage 'pretrian'"):
        pipelines.load(PIPELINES / "smoke.yaml", ["pretrian:schedule.epochs=1"])


@pytest.mark.parametrize(("text", "expected"), [("90", 90), ("01:30:00", 90), ("1-00:00:00", 1440), ("2-3", 3060),
                                                 ("45:30", 45)])
def test_slurm_time_formats(text: str, expected: int) -> None:
    assert minutes(text) == expected
