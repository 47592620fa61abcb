"""Sweep files are checked in full before anything launches; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import sweep as sweeps
from orchestrator.errors import RecipeError
from tests.conftest import ROOT

SWEEPS = ROOT / "recipes" / "sweeps"


@pytest.mark.parametrize("name", ["smoke", "drop_path_t", "lr_t", "seg_smoke", "drop_path_upernet_t"])
def test_shipped_sweeps_load(name: str) -> None:
    sweep = sweeps.load(SWEEPS / f"{name}.yaml")
    trial = sweep.trial_base()
    assert sweep.search and (trial.run.eval_every_steps if trial.schedule.iterations else trial.run.eval_every_epochs == 1)


def test_the_segmentation_sweep_counts_iterations_and_reports_every_eval() -> None:
    sweep = sweeps.load(SWEEPS / "drop_path_upernet_t.yaml")
    trial = sweep.trial_base()
    assert sweep.progress(trial) == ("step", 16000) and sweep.metric == "mIoU"
    assert (trial.task, trial.run.eval_every_steps, trial.run.eval_every_epochs, trial.model.drop_path_rate) == \
        ("segmentation", 4000, None, 0.2)
    assert trial.optimizer.lr == pytest.approx(6e-5)  # the proxy keeps the batch, so the lr
    for override, message in [("sweep.proxy={schedule.iterations: 16000}", "set it (e.g. run.eval_every_steps: 1600)"),
                              ("sweep.scheduler={grace_period: 16000}", "less than the trials' 16000 iterations"),
                              ("sweep.metric=top1", "metric: 'top1' is not one of mIoU, mAcc, aAcc (or ema_ of one)")]:
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sweeps.load(SWEEPS / "drop_path_upernet_t.yaml", [override, "run.eval_every_steps=null"]
                        if "proxy" in override else [override])


def test_proxy_batch_scales_lr_and_the_best_recipe_scales_it_back() -> None:
    sweep = sweeps.load(SWEEPS / "lr_t.yaml")
    assert sweep.base.batch.global_batch_size == 4096 and sweep.base.optimizer.lr == pytest.approx(4e-3)
    trial = sweep.trial_base()
    assert trial.batch.global_batch_size == 1024 and trial.optimizer.lr == pytest.approx(1e-3)  # linear rule
    assert trial.schedule.epochs == 30 and trial.data.train_fraction == 0.1
    full = sweep.full_recipe({"optimizer.lr": 5e-4}, "t-best")
    assert full.optimizer.lr == pytest.approx(2e-3) and full.schedule.epochs == 300 and full.run.name == "t-best"
    sqrt = sweeps.load(SWEEPS / "lr_t.yaml", ["sweep.lr_rule=sqrt"])
    assert sqrt.trial_base().optimizer.lr == pytest.approx(2e-3)


@pytest.mark.parametrize(("override", "message"), [
    ("sweep.search={}", "search: the search space is empty"),
    ("sweep.search={model.drop_rate: {grid: [0.1]}}", "model.drop_rate: no such recipe key"),
    ("sweep.search={model.drop_path_rate: {grid: [0.1, 1.5]}}", "model.drop_path_rate: 1.5 is outside [0, 1)"),
    ("sweep.search={model.drop_path_rate: {grid: [0.1, abc]}}", "model.drop_path_rate: expected float"),
    ("sweep.search={optimizer.lr: {loguniform: [0, 1.0e-3]}}", "loguniform: the low bound must be positive"),
    ("sweep.search={optimizer.lr: {normal: [1, 2]}}", "search.optimizer.lr: expected one of"),
    ("sweep.search={optimizer.lr: {uniform: [2, 1]}}", "expected [low, high] with low < high"),
    ("sweep.proxy={schedule.epoch: 3}", "schedule.epoch: no such recipe key"),
    ("sweep.metric=ema_top1", "needs EMA, but the recipe has ema.decay null"),
    ("sweep.metric=accuracy", "metric: 'accuracy' is not one of"),
    ("sweep.scheduler={grace_period: 3}", "scheduler.grace_period: 3 must be at least 1 and less than"),
    ("sweep.lr_rule=cubic", "lr_rule: 'cubic' is not linear, sqrt or none"),
    ("sweep.colour=red", "unknown key(s) ['colour']"),
])
def test_bad_sweeps_fail_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        sweeps.load(SWEEPS / "smoke.yaml", [override])
    assert message in str(err.value)


def test_recipe_overrides_reach_the_trials(tmp_path: Path) -> None:
    sweep = sweeps.load(SWEEPS / "smoke.yaml", [f"data.train={tmp_path}/train", "model.drop_path_rate=0.3"])
    assert sweep.trial_base().data.train == f"{tmp_path}/train"
    assert sweeps.space(sweep)["model.drop_path_rate"] == {"grid_search": [0.0, 0.6]}


def test_inline_secrets_go_to_the_ray_job_environment_or_are_refused_once_it_is_fixed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import pickle

    from orchestrator import recipe as recipes
    from orchestrator.launch import ray_train

    options = {"key": "K3Y", "secret": "S3CR3T", "endpoint_url": "http://127.0.0.1:9"}
    sweep = sweeps.load(SWEEPS / "smoke.yaml", ["sweep.storage=s3://b", f"sweep.storage_options={json.dumps(options)}"])
    base = recipes.with_values(sweep.trial_base(), {"run.storage_options": sweep.storage_options})
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv(recipes.SECRETS_ENV, raising=False)
    env = ray_train.secret_environment(base)
    assert json.loads(env[recipes.SECRETS_ENV])["run"] == {"key": "K3Y", "secret": "S3CR3T"}
    assert ray_train.secret_environment(recipes.with_values(base, {"run.storage_options": {}})) == {}

    # Ray's storage filesystem pickles without the secrets and reopens with them from the environment.
    _, fs = ray_train.storage_for_ray("s3://b/runs", options)
    data = pickle.dumps(fs)
    assert b"S3CR3T" not in data and b"K3Y" not in data
    monkeypatch.setenv(recipes.SECRETS_ENV, env[recipes.SECRETS_ENV])
    assert pickle.loads(data).handler.fs.secret == "S3CR3T"

    monkeypatch.delenv(recipes.SECRETS_ENV)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # inside `ray job submit`
    with pytest.raises(RecipeError, match=r"run.storage_options.key, run.storage_options.secret: secrets reach Ray's"):
        ray_train.connect(env)
    monkeypatch.setenv(recipes.SECRETS_ENV, env[recipes.SECRETS_ENV])  # the job was submitted with them
    ray_train._check_job_environment(env)
