"""The Ray launcher on a real local Ray cluster (``ray start --head`` on 127.0.0.1, 2 CPUs).

Each Ray Train ``fit`` costs 15-30 s here, so the runs are few and tiny (32 px, one short epoch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from orchestrator import faults, pretrain
from orchestrator import recipe as recipes
from orchestrator.launch import ray_train
from orchestrator.rundir import MARKER, RunDir
from orchestrator.train.context import TrainContext
from tests.conftest import ROOT, smoke_recipe
from tests.services import ACCESS_KEY, SECRET_KEY, MlflowServer, RayCluster, S3Store, poll

pytestmark = pytest.mark.timeout(300)


def test_cluster_yaml_passes_rays_own_schema_and_is_locked() -> None:
    """Ray's own validation; token authentication on every node, the token file shipped from outside the
    checkout, and no Ray port opened to the network (the dashboard and job server on the head's loopback)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("p")
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts)
    (head,) = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(raw)
    (generate,) = [line for line in (ROOT / "cluster.yaml").read_text().splitlines() if "get-auth-token" in line]
    assert generate.lstrip("# ").startswith("(umask 077 &&")  # the token file is created unreadable to others
    token = [(remote, local) for remote, local in raw["file_mounts"].items() if "token" in remote]
    assert len(token) == 1 and token[0][1].startswith("~/") and not (ROOT / token[0][1]).exists()


def test_without_a_cluster_address_the_driver_starts_a_local_cluster_and_stops_it(synth_dir: Path) -> None:
    """The laptop path (the README's first command), twice side by side, as two experiments on one machine: no
    ``RAY_ADDRESS``, so each driver starts its own cluster, trains on it without Ray Train's preemption watcher (no
    local node is ever drained), with clean logs (every process of a run knows its cluster's address, so Ray
    Train's placement-group cleaner does not find two and die), and leaves no process of it behind."""
    import psutil

    temp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # Ray's socket paths must stay short

    def left() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]

    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(temp)}
    env.pop(ray_train.PREEMPTION_WATCHER_ENV, None)
    names = [unique("laptop"), unique("beside")]
    sets = [f"data.train={synth_dir}/train", "data.val=null", "data.input_size=32", "data.num_workers=0",
            "batch.global_batch_size=32", "batch.per_device_max=32", "run.max_steps=2", f"run.storage={temp}/runs",
            "scaling.cpus_per_worker=1"]
    try:
        drivers = [subprocess.Popen([sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", "--set", *sets,
                                     f"run.name={name}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name in names]
        for driver, name in zip(drivers, names, strict=True):
            out = driver.communicate(timeout=240)[0]
            assert driver.returncode == 0, out[-3000:]
            assert "(RayTrainWorker pid=" in out and "\x1b[" not in out  # no colour codes in a file or pipe
            assert "Found multiple active Ray instances" not in out and "Traceback" not in out, out[-3000:]
            assert RunDir(f"{temp}/runs/{name}").last_record()["step"] == 2
        sessions = list((temp / "ray").glob("session_2*"))
        assert len(sessions) == 2
        for session in sessions:
            actors = {m.group(1) for f in (session / "logs").glob("worker-*.out")
                      if (m := re.search(r"^:actor_name:(\w+)$", f.read_text(), re.M))}
            assert {"TrainController", "RayTrainWorker", "StopRelay"} <= actors and "PreemptionWatcher" not in actors
        poll(lambda: not left(), 30, "the exit of every process of the local clusters")
    finally:
        for proc in left():
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_job_without_the_clusters_token_is_refused(ray_cluster: RayCluster) -> None:
    """The test cluster runs with token authentication (as cluster.yaml): ``ray job submit`` without the token,
    or with another, is refused and runs nothing; the job API refuses an unauthenticated request; the token works."""
    import urllib.error
    import urllib.request

    marker = Path(ray_cluster.temp_dir).parent / "pwned"
    ray = str(Path(sys.executable).parent / "ray")
    for auth in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "not-the-token"}):
        env = {**{k: v for k, v in ray_cluster.env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}, **auth}
        done = subprocess.run([ray, "job", "submit", "--address", ray_cluster.dashboard, "--", "touch", str(marker)],
                              env=env, capture_output=True, text=True, timeout=60)
        refused = re.search(r"Unauthorized|Forbidden|token is missing or incorrect", done.stdout + done.stderr)
        assert done.returncode != 0 and refused, done.stdout + done.stderr
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_cluster.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    token = ray_cluster.token_path.read_text().strip()
    request = urllib.request.Request(f"{ray_cluster.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(request, timeout=30).status == 200
    # The GCS port (6379 in cluster.yaml): a driver without the token is refused there too.
    connect = f"import ray; ray.init(address={ray_cluster.address!r}); ray.get(ray.remote(lambda: 1).remote())"
    env = {**{k: v for k, v in ray_cluster.env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")},
           "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", connect], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and re.search(r"(?i)unauthenticated|unauthorized|auth", done.stderr), done.stderr[-2000:]
    assert not marker.exists()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_ray_job_submit_trains_into_s3(ray_cluster: RayCluster, s3_store: S3Store, synth_dir: Path) -> None:
    """The user's command: ``ray job submit --working-dir . -- python -m orchestrator.pretrain ...``."""
    import s3fs
    import timm
    from ray.job_submission import JobStatus, JobSubmissionClient

    bucket, name = s3_store.bucket("ray-runs"), unique("job")
    options = json.dumps({"endpoint_url": s3_store.endpoint})  # credentials come from the job's environment
    runtime_env = {"env_vars": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}
    sets = [f"data.train={synth_dir}/train", f"data.val={synth_dir}/val", "data.input_size=32", "data.num_workers=0",
            "batch.global_batch_size=32", "batch.per_device_max=32", "schedule.epochs=1", "run.log_every_steps=5",
            f"run.name={name}", f"run.storage={bucket}", f"run.storage_options={options}"]
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
               "--working-dir", ".", "--submission-id", name, "--runtime-env-json", json.dumps(runtime_env),
               "--", "python", "-m", "orchestrator.pretrain", "recipes/smoke.yaml", *(f"--set={s}" for s in sets)]
    done = subprocess.run(command, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=240)
    logs = done.stdout + done.stderr

    assert done.returncode == 0, logs[-4000:]
    assert JobSubmissionClient(ray_cluster.dashboard).get_job_status(name) == JobStatus.SUCCEEDED
    assert "images_per_sec=" in logs and "top1=" in logs and "ETA" in logs  # the per-epoch progress line
    fs = s3fs.S3FileSystem(**s3_store.options, skip_instance_cache=True)
    run = f"{bucket.removeprefix('s3://')}/{name}"
    records = [json.loads(line) for line in fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    epoch = [r for r in records if r.get("kind") == "epoch"]
    assert epoch and epoch[-1]["step"] == 10 and epoch[-1]["val_images"] == 80
    assert [c.step for c in RunDir(f"{bucket}/{name}", s3_store.options).committed()] == [10]
    weights = Path(ray_cluster.temp_dir).parent / f"{name}.safetensors"
    weights.write_bytes(fs.cat_file(f"{run}/model.safetensors"))
    model = timm.create_model("inception_next_atto", num_classes=10, pretrained=True,
                              pretrained_cfg_overlay={"file": str(weights), "num_classes": 10})
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_inline_storage_secrets_reach_ray_only_through_the_job_environment(ray_cluster: RayCluster, s3_store: S3Store,
                                                                         synth_dir: Path) -> None:
    """Key and secret in run.storage_options on the command line, attached to a running cluster: the run
    commits into the store, and nothing there (Ray's own state included) holds the secret."""
    import s3fs

    bucket, name = s3_store.bucket("inline"), unique("inline")
    sets = [f"data.train={synth_dir}/train", f"data.val={synth_dir}/val", "data.input_size=32", "data.num_workers=0",
            "batch.global_batch_size=32", "batch.per_device_max=32", "run.max_steps=2", f"run.name={name}",
            f"run.storage={bucket}", f"run.storage_options={json.dumps(s3_store.options)}"]
    command = [sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", "--set", *sets]
    done = subprocess.run(command, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c.step for c in RunDir(f"{bucket}/{name}", s3_store.options).committed()] == [2]
    fs = s3fs.S3FileSystem(**s3_store.options, skip_instance_cache=True)
    files = fs.find(bucket.removeprefix("s3://"))
    assert [f for f in files if s3_store.options["secret"].encode() in fs.cat_file(f)] == []


def test_a_relative_storage_inside_a_ray_job_is_refused(ray_cluster: RayCluster, synth_dir: Path) -> None:
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard,
               "--working-dir", ".", "--", "python", "-m", "orchestrator.pretrain", "recipes/smoke.yaml",
               f"--set=data.train={synth_dir}/train", f"--set=data.val={synth_dir}/val", "--set=run.storage=runs"]
    done = subprocess.run(command, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "run.storage='runs' is relative, which inside a Ray job means" in done.stdout + done.stderr


def _grads_after_one_step(config: dict[str, Any]) -> None:
    """Ray Train worker: one training step of the loop on fixed data; rank 0 saves the (all-reduced) gradients."""
    import ray
    import ray.train

    from orchestrator.train import loop

    recipe = recipes.from_dict(config["recipe"])
    tctx = ray.train.get_context()
    ctx = TrainContext(run=RunDir(config["run_dir"]), rank=tctx.get_world_rank(), world_size=tctx.get_world_size())
    c = loop.build(recipe, ctx, resuming=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=g)  # as the loader hands them over
    labels = torch.randint(0, 10, (32,), generator=g)
    share = 32 // ctx.world_size
    mine = range(ctx.rank * share, (ctx.rank + 1) * share, c.plan.micro_batch)
    micro = iter([(images[i:i + c.plan.micro_batch], labels[i:i + c.plan.micro_batch], torch.arange(i, i + c.plan.micro_batch),
                   None) for i in mine])
    loop.train_step(c, recipe, ctx, {"step": 0, "nonfinite": 0}, micro)
    if ctx.rank == 0:
        torch.save({n: p.grad.clone() for n, p in c.model.named_parameters() if p.grad is not None}, config["out"])
    Path(f"{config['out']}.node{ctx.rank}").write_text(ray.get_runtime_context().get_node_id())


def ddp_gradients(synth_dir: Path, tmp_path: Path, placement: str = "PACK") -> tuple[dict[int, Any], set[str]]:
    """One step's all-reduced gradients at global batch 32, by worker count (1 worker x 2 micro-batches of 16,
    2 workers x 16: BatchNorm sees 16 either way), and the Ray nodes the 2 workers ran on."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests package
    recipe = smoke_recipe(tmp_path, synth_dir, "batch.per_device_max=16", "model.drop_path_rate=0.0")
    grads = {}
    for workers in (1, 2):
        out = tmp_path / f"grads-{workers}.pt"
        TorchTrainer(
            _grads_after_one_step,
            train_loop_config={"recipe": recipe.to_dict(redact=False), "run_dir": str(tmp_path / "ddp"), "out": str(out)},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}, placement_strategy=placement),
            run_config=RunConfig(name=unique(f"ddp{workers}"), storage_path=str(tmp_path / "ray")),
        ).fit()
        grads[workers] = torch.load(out)
    return grads, {(tmp_path / f"grads-2.pt.node{rank}").read_text() for rank in range(2)}


def assert_same_gradients(grads: dict[int, Any]) -> None:
    assert grads[1].keys() == grads[2].keys() and len(grads[1]) > 50
    for name, g1 in grads[1].items():
        torch.testing.assert_close(grads[2][name], g1, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert max(float(g.abs().max()) for g in grads[1].values()) > 1e-3  # a real step, not all-zero gradients


# SIGKILL: the worker vanishes with no unwinding, as under an OOM kill or a lost machine; for Ray Train a raised error
# (the fault kind "raise") ends the worker group the same way.
def test_a_worker_killed_mid_upload_restarts_from_the_checkpoint_before_the_torn_one(
        driver: RayCluster, synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of 2 is SIGKILLed while the step-4 checkpoint uploads (half of it in storage, no marker), on the first
    attempt only: Ray restarts the group, which skips the torn checkpoint and resumes from step 2."""
    kind = "tear"
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv(faults.ENV, f"{kind}:4:0:{marker}")
    recipe = smoke_recipe(tmp_path, synth_dir, f"run.name={unique(kind)}", "schedule.epochs=1", "scaling.num_workers=2",
                          "scaling.cpus_per_worker=1", "scaling.max_failures=2", "run.checkpoint_every_steps=2",
                          "batch.per_device_max=16")
    metrics = pretrain.train(recipe, "ray")

    assert marker.read_text().startswith(f"{kind} at step 4 on rank 0")
    assert metrics["step"] == 10 and metrics["val_images"] == 80
    run = tmp_path / "runs" / recipe.run.name
    assert json.loads((run / "checkpoints" / "step-00000010" / MARKER).read_text())["step"] == 10
    records = RunDir(str(run)).records()
    assert [r["step"] for r in records if r["kind"] == "resume"] == [2]  # the torn step-4 checkpoint was skipped
    after = records[[r["kind"] for r in records].index("resume") + 1:]
    assert [r["step"] for r in after if r["kind"] == "train"] == [4, 6, 8, 10]  # and nothing before it was redone
    assert (run / "model.safetensors").exists()


def test_pipeline_under_ray_resumes_a_stage_another_launcher_started(driver: RayCluster, mlflow_server: MlflowServer,
                                                                      synth_dir: Path, tmp_path: Path) -> None:
    """Stage 1 stopped (as if preempted) under the local launcher; the Ray pipeline finishes it, then runs stage 2.
    In MLflow: one parent run for the pipeline, each stage's run nested under it (stage 1's since it resumed)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline import command as pipeline
    from orchestrator.pipeline import spec as pipeline_file
    from orchestrator.train.context import StopRequested
    from orchestrator.train.loop import train
    from tests.conftest import StopAfter

    experiment = unique("pipeline")
    sets = [f"data.train={synth_dir}/train", f"data.val={synth_dir}/val", "data.num_workers=0", "data.input_size=32",
            "batch.global_batch_size=32", "batch.per_device_max=32", "run.log_every_steps=2",
            "pretrain:schedule.epochs=1", "finetune:run.max_steps=2", "run.trackers=[mlflow]",
            f"run.tracking_uri={mlflow_server.uri}", f"run.experiment={experiment}"]
    smoke = ROOT / "recipes" / "pipelines" / "smoke.yaml"
    p = pipeline_file.load(smoke, sets, storage_url=str(tmp_path / "runs"))
    pretrain = pipeline_file.stage_recipe(p, p.stages[0])
    with pytest.raises(StopRequested):
        train(pretrain, StopAfter(4, tmp_path / "runs" / "smoke-pretrain"))
    started = time.time()

    assert pipeline.main([str(smoke), "--launcher=ray", f"--storage={tmp_path}/runs", *(f"--set={s}" for s in sets)]) == 0

    records = [json.loads(line) for line in (tmp_path / "runs" / "smoke-pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [(r["step"], r["time"] < started) for r in records if r["kind"] == "train"]
    assert train_steps == [(2, True), (4, True), (6, False), (8, False), (10, False)]  # resumed at 4, not redone
    for stage in ("smoke-pretrain", "smoke-finetune"):
        assert (tmp_path / "runs" / stage / "model.safetensors").exists()
    rows, _ = pipeline.status(p)
    assert rows[1]["state"] == "complete" and rows[1]["launcher"] == "ray"
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert (parent.info.run_name, parent.info.status) == ("smoke", "FINISHED")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["smoke-finetune", "smoke-pretrain"] and len(runs) == 3
    assert all(r.info.status == "FINISHED" and r.data.tags["launcher"] == "ray" for r in children.values())
