"""Ray Tune sweeps on the real local Ray cluster: each trial a Ray Train run of the loop, ASHA over epochs (or
iterations, for segmentation)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from orchestrator import recipe as recipes
from orchestrator import sweep as sweeps
from orchestrator import tune as sweep_runner
from orchestrator.rundir import Checkpoint, RunDir
from tests.conftest import ROOT, assert_stopped_at
from tests.services import MlflowServer, RayCluster, S3Store, poll

pytestmark = pytest.mark.timeout(300)  # a Tune failure tends to be a silent hang


def data_sets(data: Path, storage: Path) -> list[str]:
    return [f"data.train={data}/train", f"data.val={data}/val", "data.input_size=32", "data.num_workers=0",
            "data.train_fraction=1.0", "batch.global_batch_size=32", "batch.per_device_max=32",
            "augment.auto_augment=null", f"sweep.storage={storage}"]


def test_drop_path_grid_survives_an_interruption_and_gives_table_plot_and_best_recipe(
        driver: RayCluster, synth_dir: Path, tmp_path: Path) -> None:
    """The shipped smoke sweep, stopped with Ctrl-C (SIGINT to its process group) after the first checkpoint: each
    running trial checkpoints at its stop step, as one run does; then the same command continues it."""
    sets = [*data_sets(synth_dir, tmp_path), "sweep.scheduler=null",  # ASHA could stop either trial; tested below
            "sweep.proxy={schedule.epochs: 2, data.train_fraction: 0.5, scaling.cpus_per_worker: 1}",
            "run.checkpoint_every_steps=2",  # the first checkpoint at step 2 of 8: the Ctrl-C lands mid-run
            "run.keep_checkpoints=8"]  # the one it resumed from is still there at the end, whichever it was
    command = [sys.executable, "-m", "orchestrator.tune", "recipes/sweeps/smoke.yaml", *(f"--set={s}" for s in sets)]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, cwd=ROOT, env=driver.env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    def first_checkpoint() -> tuple[Path, Checkpoint] | None:
        return next(((run, c) for run in (tmp_path / "smoke" / "trials").glob("*") for c in RunDir(str(run)).committed()),
                    None)

    try:
        run_path, _ = poll(first_checkpoint, 180, "the first committed trial checkpoint")
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(timeout=60) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
    printed = (tmp_path / "first.log").read_text()
    assert "stopped on SIGINT, each running trial checkpointed at its stop step" in printed
    assert "Trial status" not in printed and "╭" not in printed and "best_top1" in printed  # our table, not Tune's boxes
    interrupted_trials = {p.name for p in (tmp_path / "smoke" / "trials").iterdir()}
    checkpoint = RunDir(str(run_path)).latest()  # where that trial stood when the sweep was interrupted
    for trial in (tmp_path / "smoke" / "trials").iterdir():  # every trial that had started stopped gracefully
        stop = [r for r in RunDir(str(trial)).records() if r["kind"] == "stop"]
        if stop:
            assert_stopped_at(trial, stop[0]["step"], "SIGINT")
    assert [r["kind"] for r in RunDir(str(run_path)).records()][-1] == "stop"

    table = sweep_runner.run(sweeps.load(ROOT / "recipes" / "sweeps" / "smoke.yaml", sets))

    assert set(table["trial"]) >= interrupted_trials and len(table) == 2  # the same trials, continued
    # Its run resumed after that checkpoint instead of redoing it: the same commit (a redone one is written anew)
    # and a resume record at its step.
    assert next(c for c in RunDir(str(run_path)).committed() if c.step == checkpoint.step).meta == checkpoint.meta
    records = RunDir(str(run_path)).records()
    assert [r["step"] for r in records if r["kind"] == "resume"] == [checkpoint.step]
    assert sorted(table["model.drop_path_rate"]) == [0.0, 0.6]
    assert (table["epochs"] == 2).all() and not table["stopped_early"].any() and (table["error"] == "").all()
    out = tmp_path / "smoke"
    assert pd.read_csv(out / "results.csv")["trial"].tolist() == table["trial"].tolist()
    assert (out / "results.png").stat().st_size > 5000
    best = recipes.load(out / "best_recipe.yaml")
    assert best.model.drop_path_rate == table.iloc[0]["model.drop_path_rate"]
    assert best.schedule.epochs == 8 and best.data.train_fraction == 1.0  # the full recipe, not the proxy
    for trial in table["trial"]:  # every trial is a complete run of the loop, final weights included
        run = out / "trials" / trial
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and json.loads((run / "config.json").read_text())["schedule"]["epochs"] == 2
        assert load_file(run / "model.safetensors")


def test_asha_stops_a_hopeless_trial_early_in_a_sweep_whose_store_secrets_reach_the_trials_by_environment_only(
        ray_cluster: RayCluster, s3_store: S3Store, mlflow_server: MlflowServer, synth_dir: Path, tmp_path: Path) -> None:
    """ASHA stops the lr=5 trial after its first epoch. In MLflow: one parent run for the sweep, a child per trial.
    Key and secret are in sweep.storage_options, the sweep on the S3 store: the trials train and commit there, and
    no object in the store (Tune's pickled state included) holds the secret."""
    import s3fs
    from mlflow.tracking import MlflowClient

    bucket, experiment = s3_store.bucket("sweeps"), f"asha-{tmp_path.name}"
    sets = [*data_sets(synth_dir, tmp_path), f"sweep.storage={bucket}", f"sweep.storage_options={json.dumps(s3_store.options)}",
            "schedule.warmup_epochs=0", "sweep.name=asha", "sweep.search={optimizer.lr: {grid: [4.0e-3, 5.0]}}",
            "sweep.proxy={schedule.epochs: 3}", "sweep.max_concurrent_trials=1",
            "sweep.scheduler={grace_period: 1, reduction_factor: 2}", "run.trackers=[mlflow]",
            f"run.tracking_uri={mlflow_server.uri}", f"run.experiment={experiment}"]
    command = [sys.executable, "-m", "orchestrator.tune", "recipes/sweeps/smoke.yaml", *(f"--set={s}" for s in sets)]
    done = subprocess.run(command, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]

    fs = s3fs.S3FileSystem(**s3_store.options, skip_instance_cache=True)
    with fs.open(f"{bucket.removeprefix('s3://')}/asha/results.csv") as f:
        table = pd.read_csv(f).set_index("optimizer.lr")
    assert not table.loc[4.0e-3, "stopped_early"] and table.loc[4.0e-3, "epochs"] == 3
    assert table.loc[5.0, "stopped_early"] and table.loc[5.0, "epochs"] == 1
    assert table.loc[5.0, "best_top1"] < table.loc[4.0e-3, "best_top1"]
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert (parent.info.run_name, parent.info.status) == ("asha", "FINISHED")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(table["trial"]) and len(runs) == 3
    finished = children[table.loc[4.0e-3, "trial"]]
    assert finished.info.status == "FINISHED" and finished.data.params["optimizer.lr"] == "0.004"
    assert len(client.get_metric_history(finished.info.run_id, "top1")) == 3  # an evaluation per epoch

    files = fs.find(bucket.removeprefix("s3://"))
    assert any(f.endswith("/COMMITTED") for f in files) and any(f.endswith("tuner.pkl") for f in files)
    secret = s3_store.options["secret"].encode()
    assert [f for f in files if secret in fs.cat_file(f)] == []
