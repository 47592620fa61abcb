"""MLflow against a real ``mlflow server`` (SQLite, local artifacts) on loopback, W&B in its offline mode read
back from its own files: params, metrics at their steps, artifacts, one tracker run across a resume on another
launcher, a server that dies mid-run costing one warning, and a failed pipeline's parent run. (Sweeps and
pipelines as parent and child runs: test_tune.py's ASHA test, test_ray.py's and test_slurm.py's pipeline tests.)"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator import pretrain
from orchestrator import recipe as recipes
from orchestrator.rundir import RunDir
from tests.conftest import ROOT
from tests.services import MlflowServer, RayCluster, poll

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def smoke_sets(data: Path, storage: Path, name: str, *more: str) -> list[str]:
    return [f"data.train={data}/train", f"data.val={data}/val", "data.input_size=32", "data.num_workers=0",
            "data.shuffle_buffer=64", "batch.global_batch_size=32", "batch.per_device_max=32", "schedule.epochs=2",
            "run.log_every_steps=2", f"run.storage={storage}", f"run.name={name}", *more]


def wandb_history(run: Path, key: str) -> dict[int, float]:
    """``key`` by our step from every W&B offline run file under ``run`` (one per attempt): the records of
    W&B's transaction log (a LevelDB-style log of protobuf ``Record`` messages)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[int, float] = {}
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, payload = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a record header never straddles a block: the rest is padding
                pos += block - pos % block
                continue
            length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
            payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(payload)
                payload = b""
                if record.WhichOneof("record_type") == "history":
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    if key in items:
                        out[int(items["step"])] = items[key]
    return out


def test_mlflow_and_wandb_get_the_run_and_a_resume_on_another_launcher_continues_the_same_tracker_runs(
        mlflow_server: MlflowServer, ray_cluster: RayCluster, synth_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten steps under Ray (two workers; the tracking settings reach them through the job's environment), the
    other ten in this process: one MLflow run and one W&B run, every metrics.jsonl record at its step in both."""
    from mlflow.tracking import MlflowClient

    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    sets = smoke_sets(synth_dir, tmp_path / "runs", "tracked", "run.trackers=[tensorboard, mlflow, wandb]",
                      f"run.experiment={experiment}", "run.tracker_weights=true")
    settings = {"MLFLOW_TRACKING_URI": mlflow_server.uri, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", "--set", *sets,
                           "run.max_steps=10"], cwd=ROOT, env={**ray_cluster.env, **settings}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "tracked"
    ids = json.loads((run / "trackers.json").read_text())
    assert set(ids) == {"mlflow", "wandb"}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", sets)
    pretrain.train(recipe)
    records = RunDir(str(run)).records()
    assert [(r["step"], r["launcher"]) for r in records if r["kind"] == "resume"] == [(10, "local")]
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same tracker runs, continued

    client = MlflowClient(mlflow_server.uri)
    tracked = client.get_run(ids["mlflow"])
    assert (tracked.info.status, tracked.info.run_name) == ("FINISHED", "tracked")
    assert client.get_experiment(tracked.info.experiment_id).name == experiment
    params, tags = tracked.data.params, tracked.data.tags
    assert params["optimizer.lr"] == str(recipe.optimizer.lr) and params["model.name"] == "inception_next_atto"
    assert params["run.trackers"] == '["tensorboard", "mlflow", "wandb"]' and params["data.input_size"] == "32"
    assert (tags["launcher"], tags["world_size"], tags["run_url"]) == ("local", "1", str(run)) and tags["code_version"]
    train = {r["step"]: r["train_loss"] for r in records if r["kind"] == "train"}
    assert sorted(train) == list(range(2, 21, 2))
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "train_loss")} == train
    top1 = {r["step"]: r["top1"] for r in records if r["kind"] == "epoch"}
    assert sorted(top1) == [10, 20] and {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "top1")} == top1
    assert {a.path for a in client.list_artifacts(ids["mlflow"])} == {"curves.png", "config.json", "model.safetensors"}

    assert wandb_history(run, "train_loss") == train and wandb_history(run, "top1") == top1
    assert len(list(run.glob("wandb/offline-run-*"))) == 2  # one per attempt, the same W&B run id
    assert all(p.name.endswith(ids["wandb"]) for p in run.glob("wandb/offline-run-*"))


def test_a_tracking_server_that_dies_mid_run_costs_one_warning(synth_dir: Path, tmp_path: Path) -> None:
    """The server killed once the run's MLflow run exists and training is under way: training finishes, every
    record is in metrics.jsonl, and the failure is one warning."""
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    sets = smoke_sets(synth_dir, tmp_path / "runs", "orphan", "run.trackers=[mlflow]", f"run.tracking_uri={server.uri}",
                      "schedule.epochs=4")
    run = tmp_path / "runs" / "orphan"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", "--launcher=local",
                             "--set", *sets], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        def under_way() -> Any:
            ids = RunDir(str(run)).read_json("trackers.json") or {}
            return "mlflow" in ids and any(r["kind"] == "train" for r in RunDir(str(run)).records())
        poll(under_way, 120, "the run's MLflow run and its first logged step")
        server.stop()
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("tracker mlflow failed") == 1, err[-3000:]
    records = RunDir(str(run)).records()
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, 41, 2))
    assert (run / "model.safetensors").exists()


def test_a_pipeline_whose_stage_fails_ends_its_parent_run_failed(mlflow_server: MlflowServer, synth_dir: Path,
                                                                 tmp_path: Path) -> None:
    """A local pipeline: stage 1 trains, stage 2's data is missing. The error is the pipeline's, and in MLflow the
    pipeline's parent run ends FAILED (not RUNNING forever) with stage 1's run, FINISHED, under it."""
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline import command as pipeline

    experiment = f"failing-{uuid.uuid4().hex[:8]}"
    sets = [f"data.train={synth_dir}/train", f"data.val={synth_dir}/val", "data.num_workers=0", "data.input_size=32",
            "batch.global_batch_size=32", "batch.per_device_max=32", "pretrain:run.max_steps=2",
            f"finetune:data.train={tmp_path}/missing", "run.trackers=[mlflow]", f"run.tracking_uri={mlflow_server.uri}",
            f"run.experiment={experiment}"]
    smoke = ROOT / "recipes" / "pipelines" / "smoke.yaml"
    assert pipeline.main([str(smoke), "--launcher=local", f"--storage={tmp_path}/runs", *(f"--set={s}" for s in sets)]) == 2
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert (parent.info.run_name, parent.info.status) == ("smoke", "FAILED")
    (child,) = [r for r in runs if r is not parent]
    assert (child.info.run_name, child.info.status, child.data.tags["mlflow.parentRunId"]) == (
        "smoke-pretrain", "FINISHED", parent.info.run_id)


def test_a_server_down_when_the_run_starts_gets_every_metric_once_it_is_up(synth_dir: Path, tmp_path: Path) -> None:
    """The tracker's start fails (nothing listens yet) and is retried with its queued records behind it: the server
    started afterwards ends up with the run, every metric at its step, and the run's final status."""
    from mlflow.tracking import MlflowClient

    from orchestrator.train import trackers

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", smoke_sets(
        synth_dir, tmp_path / "runs", "late", "run.trackers=[mlflow]", f"run.tracking_uri={server.uri}"))
    run = RunDir(str(tmp_path / "runs" / "late"))
    tracked = trackers.Trackers(recipe, run, "local", 1, tmp_path / "local")
    for step in range(1, 21):
        tracked.log({"kind": "train", "step": step, "train_loss": 1.0 / step})
    (_, background), = tracked.active
    poll(lambda: background.failed, 30, "the tracker's first failed call")
    try:
        server.start()
        tracked.finish("finished", {"config.json": b"{}"})
        client = MlflowClient(server.uri)
        run_id = json.loads((tmp_path / "runs" / "late" / "trackers.json").read_text())["mlflow"]
        assert client.get_run(run_id).info.status == "FINISHED"
        history = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
        assert history == {step: 1.0 / step for step in range(1, 21)}
    finally:
        server.stop()


def test_a_tracker_left_behind_uploading_still_ends_its_run(mlflow_server: MlflowServer, synth_dir: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An artifact upload that outlasts the drain: the run's status is ended from outside the thread (not RUNNING
    forever), and the staged files stay for the thread still reading them."""
    import time

    from mlflow.tracking import MlflowClient

    from orchestrator.train import trackers

    monkeypatch.setattr(trackers, "CLOSE_TIMEOUT_S", 0.5)
    staged: list[Path] = []
    monkeypatch.setattr(trackers.MlflowTracker, "artifacts", lambda self, paths: (staged.extend(paths), time.sleep(5)))
    recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", smoke_sets(
        synth_dir, tmp_path / "runs", "slow", "run.trackers=[mlflow]", f"run.tracking_uri={mlflow_server.uri}"))
    tracked = trackers.Trackers(recipe, RunDir(str(tmp_path / "runs" / "slow")), "local", 1, tmp_path / "local")
    tracked.log({"kind": "train", "step": 1, "train_loss": 1.0})
    ids = tmp_path / "runs" / "slow" / "trackers.json"
    poll(lambda: ids.exists() and "mlflow" in json.loads(ids.read_text()), 60, "the MLflow run")
    tracked.finish("finished", {"model.safetensors": b"0" * 1000})
    run_id = json.loads(ids.read_text())["mlflow"]
    assert MlflowClient(mlflow_server.uri).get_run(run_id).info.status == "FINISHED"
    assert staged and all(p.exists() for p in staged)


def test_no_secret_reaches_wandb_or_the_run_folder(synth_dir: Path, tmp_path: Path) -> None:
    """A password in run.tracking_uri on the command line and an API key in the environment: W&B's own files
    (its metadata records the command line: wandb-metadata.json, or the transaction log) and everything else
    under the run folder hold neither."""
    marker, key = f"pw-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    sets = smoke_sets(synth_dir, tmp_path / "runs", "secret", "run.trackers=[wandb]", "run.max_steps=2",
                      f"run.tracking_uri=http://someone:{marker}@127.0.0.1:9/")
    env = {**{k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}, "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "MY_SERVICE_API_KEY": key}
    done = subprocess.run([sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", "--launcher=local",
                           "--set", *sets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "secret"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert list(run.glob("wandb/offline-run-*/run-*.wandb")) and len(files) > 10  # W&B's own files are among them
    assert [p for p in files if marker.encode() in p.read_bytes() or key.encode() in p.read_bytes()] == []
    assert json.loads((run / "config.json").read_text())["run"]["tracking_uri"] == "http://someone:***@127.0.0.1:9/"
