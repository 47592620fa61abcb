"""Recipes: the paper's Table 1 values, inheritance, overrides and errors that name file and key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import recipe as recipes
from orchestrator.errors import RecipeError
from tests.conftest import ROOT

R = ROOT / "recipes"

# Supplementary Table 1, column by column: (recipe, dotted key, value).
TABLE_1 = {
    "a": {"data.input_size": 224, "schedule.epochs": 450, "batch.global_batch_size": 1280, "optimizer.name": "adamw",
          "optimizer.eps": 1e-8, "optimizer.betas": [0.9, 0.999], "optimizer.lr": 1e-3, "schedule.sched": "cosine",
          "optimizer.clip_grad": None, "schedule.warmup_epochs": 5, "optimizer.weight_decay": 0.05,
          "augment.auto_augment": "rand-m5-inc1-mstd101", "augment.repeated_aug": False, "augment.cutmix": 1.0,
          "augment.mixup": 0.2, "augment.mixup_switch_prob": 0.5, "augment.re_prob": 0.1, "augment.label_smoothing": 0.1,
          "model.drop_path_rate": 0.1, "model.head_dropout": 0.0, "model.ls_init_value": 1e-6, "ema.decay": None,
          "model.name": "inception_next_atto"},
    **{size: {"data.input_size": 224, "schedule.epochs": 300, "batch.global_batch_size": 4096, "optimizer.name": "adamw",
              "optimizer.eps": 1e-8, "optimizer.betas": [0.9, 0.999], "optimizer.lr": 4e-3, "schedule.sched": "cosine",
              "optimizer.clip_grad": None, "schedule.warmup_epochs": 20, "optimizer.weight_decay": 0.05,
              "augment.auto_augment": "rand-m9-mstd0.5-inc1", "augment.repeated_aug": False, "augment.cutmix": 1.0,
              "augment.mixup": 0.8, "augment.mixup_switch_prob": 0.5, "augment.re_prob": 0.25,
              "augment.label_smoothing": 0.1, "model.drop_path_rate": dp, "model.head_dropout": 0.0,
              "model.ls_init_value": 1e-6, "ema.decay": None, "model.name": name}
       for size, dp, name in [("t", 0.1, "inception_next_tiny"), ("s", 0.3, "inception_next_small"),
                              ("b", 0.4, "inception_next_base")]},
    "b_384": {"data.input_size": 384, "schedule.epochs": 30, "batch.global_batch_size": 1024, "optimizer.name": "adamw",
              "optimizer.eps": 1e-8, "optimizer.betas": [0.9, 0.999], "optimizer.lr": 5e-5, "schedule.sched": "cosine",
              "optimizer.clip_grad": None, "schedule.warmup_epochs": 0, "optimizer.weight_decay": 0.05,
              "augment.auto_augment": "rand-m9-mstd0.5-inc1", "augment.repeated_aug": False, "augment.cutmix": 1.0,
              "augment.mixup": 0.8, "augment.mixup_switch_prob": 0.5, "augment.re_prob": 0.25,
              "augment.label_smoothing": 0.1, "model.drop_path_rate": 0.7, "model.head_dropout": 0.5,
              "ema.decay": 0.9999, "model.name": "inception_next_base", "model.init": "inceptionnext-b-in1k"},
}


def value(r: recipes.Recipe, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(r, section), key)


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_recipe_matches_table_1(name: str) -> None:
    r = recipes.load(R / f"{name}.yaml")
    wrong = {k: (value(r, k), v) for k, v in TABLE_1[name].items() if value(r, k) != v}
    assert not wrong, f"{name}.yaml differs from Table 1 (got, expected): {wrong}"


def test_official_finetune_variant_differs_only_where_the_script_does() -> None:
    table, official = recipes.load(R / "b_384.yaml").to_dict(), recipes.load(R / "b_384_official.yaml").to_dict()
    diffs = {f"{s}.{k}" for s in table if isinstance(table[s], dict) for k in table[s] if table[s][k] != official[s][k]}
    assert diffs == {"augment.mixup", "augment.cutmix", "schedule.sched", "run.name"}


def test_every_recipe_loads_and_plans_its_batch() -> None:
    for path in R.glob("*.yaml"):
        r = recipes.load(path)
        plan = recipes.plan_batch(r, recipes.world_sizes(r)[-1])
        assert plan.per_device * plan.world_size == r.batch.global_batch_size
        assert plan.micro_batch * plan.accum_steps == plan.per_device and plan.micro_batch <= r.batch.per_device_max


@pytest.mark.parametrize("world, cap, accum", [(1, 128, 32), (8, 128, 4), (32, 128, 1), (1, 16, 256), (256, 16, 1)])
def test_global_batch_and_micro_batch_are_kept_exactly_on_any_world_size(world: int, cap: int, accum: int) -> None:
    """The micro-batch comes from the recipe alone (BatchNorm sees the same batches on any world size)."""
    plan = recipes.plan_batch(recipes.load(R / "b.yaml", [f"batch.per_device_max={cap}"]), world)
    assert (plan.micro_batch, plan.accum_steps) == (cap, accum)
    assert plan.micro_batch * plan.accum_steps * world == 4096


def test_a_world_size_that_does_not_divide_the_micro_batches_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"global_batch_size=4096 is 32 micro-batches of 128 \(batch.per_device_max=128\), "
                                          r"which world size 3 does not divide; world sizes that fit: 1, 2, 4, 8, 16, 32"):
        recipes.plan_batch(recipes.load(R / "b.yaml"), 3)
    with pytest.raises(RecipeError, match=r"which world size 64 does not divide"):
        recipes.plan_batch(recipes.load(R / "b.yaml"), 64)  # 64 GPUs need batch.per_device_max=64


def test_an_elastic_range_must_keep_the_order_on_every_size() -> None:
    assert recipes.world_sizes(recipes.load(R / "smoke.yaml", ["scaling.num_workers=[1, 2]", "batch.per_device_max=32"])) == [1, 2]
    with pytest.raises(RecipeError, match=r"which world size 2 does not divide"):
        recipes.load(R / "smoke.yaml", ["scaling.num_workers=[1, 2]"])  # 64 in one micro-batch of 64
    with pytest.raises(RecipeError, match=r"scaling.num_workers: expected a positive number or \[min, max\]"):
        recipes.load(R / "smoke.yaml", ["scaling.num_workers=[2, 1]"])


def test_overrides_apply_and_are_typed() -> None:
    r = recipes.load(R / "t.yaml", ["optimizer.lr=0.002", "ema.decay=null", "optimizer.betas=[0.8, 0.99]", "scaling.num_workers=8"])
    assert r.optimizer.lr == 0.002 and r.ema.decay is None and r.optimizer.betas == [0.8, 0.99]
    assert recipes.load(R / "t.yaml", ["optimizer.lr=4e-3"]).optimizer.lr == 0.004  # YAML 1.1 reads 4e-3 as text


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"extends: {R / 'smoke.yaml'}\noptimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=rf"{path}: optimizer.learning_rate: unknown key"):
        recipes.load(path)


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown section 'optimiser'"):
        recipes.load(write(tmp_path, f"extends: {R / 'smoke.yaml'}\noptimiser:\n  lr: 0.1\n"))


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"extends: {R / 'smoke.yaml'}\nschedule:\n  epochs: ten\n")
    with pytest.raises(RecipeError, match=rf"{path}: schedule.epochs: expected int, got 'ten'"):
        recipes.load(path)


def test_negative_lr_from_override_names_set() -> None:
    with pytest.raises(RecipeError, match=r"--set: optimizer.lr: must be positive, got -0.1"):
        recipes.load(R / "smoke.yaml", ["optimizer.lr=-0.1"])


def test_the_shard_cache_is_a_local_folder_with_a_positive_limit() -> None:
    with pytest.raises(RecipeError, match=r"data.cache_dir: 's3://b/c' is a URL; the shard cache is a folder on each node"):
        recipes.load(R / "smoke.yaml", ["data.cache_dir=s3://b/c"])
    with pytest.raises(RecipeError, match=r"data.cache_limit_gb: must be positive, got 0"):
        recipes.load(R / "smoke.yaml", ["data.cache_dir=/tmp/c", "data.cache_limit_gb=0"])
    assert recipes.load(R / "smoke.yaml", ["data.cache_dir=/tmp/c"]).data.cache_limit_gb is None


def test_error_names_the_base_file_that_set_the_key(tmp_path: Path) -> None:
    base = write(tmp_path, f"extends: {R / 'smoke.yaml'}\nmodel:\n  drop_path_rate: 1.5\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nrun:\n  name: child\n", "child.yaml")
    with pytest.raises(RecipeError, match=rf"{base}: model.drop_path_rate: 1.5 is outside"):
        recipes.load(child)


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        recipes.load(tmp_path / "a.yaml")


def test_odd_micro_batch_with_mixup_is_refused() -> None:
    with pytest.raises(RecipeError, match="odd micro-batch"):
        recipes.load(R / "a.yaml", ["batch.global_batch_size=1284", "scaling.num_workers=4", "batch.per_device_max=321"])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.pretrain", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_print_config_prints_resolved_recipe() -> None:
    out = run_cli("recipes/b.yaml", "--set", "optimizer.lr=0.001", "--print-config")
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["optimizer"]["lr"] == 0.001 and config["model"]["drop_path_rate"] == 0.4


def test_missing_dataset_fails_before_launch_naming_key(tmp_path: Path) -> None:
    out = run_cli("recipes/smoke.yaml", "--launcher", "local", "--set", f"data.train={tmp_path}/nowhere",
                  "--set", f"run.storage={tmp_path}/runs")
    assert out.returncode == 2
    assert f"data.train={tmp_path}/nowhere" in out.stderr and "no manifest.json" in out.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written before the recipe is valid"


def test_secrets_never_reach_the_printed_config() -> None:
    out = run_cli("recipes/smoke.yaml", "--set", "data.storage_options={key: AKIAEXAMPLE, secret: verysecretvalue}",
                  "--print-config")
    assert out.returncode == 0, out.stderr
    assert "verysecretvalue" not in out.stdout and "AKIAEXAMPLE" not in out.stdout


def test_secrets_nested_in_storage_options_travel_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_dict(redact=True)`` hides nested secrets too; ``from_dict`` fills every one back from SECRETS_ENV,
    or names the one it lacks."""
    options = {"endpoint_url": "http://s3:9000", "client_kwargs": {"aws_secret_access_key": "N3ST3D-S3CR3T", "region_name": "x"}}
    recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", [f"run.storage_options={json.dumps(options)}"])
    shipped = recipe.to_dict(redact=True)
    assert "N3ST3D-S3CR3T" not in json.dumps(shipped)
    monkeypatch.delenv(recipes.SECRETS_ENV, raising=False)
    with pytest.raises(RecipeError, match=r"run\.storage_options\.client_kwargs\.aws_secret_access_key arrived redacted"):
        recipes.from_dict(shipped)
    with recipes.secrets_in_environment(recipe):
        assert recipes.from_dict(shipped).run.storage_options == options
