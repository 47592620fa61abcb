"""Pipelines through submitit on a real one-node Slurm (tests/slurm.py): sbatch, afterok, requeue, resubmission."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import faults, pretrain
from orchestrator.launch.slurm_cluster import job_states
from orchestrator.pipeline import command as pipelines
from orchestrator.pipeline import spec as pipeline_file
from orchestrator.rundir import RunDir
from tests.conftest import ROOT, assert_backbone_from, seg_tiny, steps_of
from tests.services import MlflowServer, poll
from tests.slurm import SlurmCluster

pytestmark = pytest.mark.timeout(400)
SMOKE = ROOT / "recipes" / "pipelines" / "smoke.yaml"


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))  # for sbatch/sacct/scancel here and in submitit
    return slurm_cluster


def tiny(data: Path) -> list[str]:
    return [f"--set=data.train={data}/train", f"--set=data.val={data}/val", "--set=data.num_workers=0",
            "--set=data.input_size=32", "--set=batch.global_batch_size=32", "--set=batch.per_device_max=32",
            "--set=augment.auto_augment=null"]


def wait_done(job: str, timeout: float = 240) -> str:
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
    return poll(lambda: (s := job_states([job])[0].get(job)) in final and s, timeout, f"Slurm job {job} to end")


def sacct_times(slurm: SlurmCluster, job: str) -> tuple[str, str]:
    start, end = slurm.run("sacct", "-n", "-X", "-P", "-o", "Start,End", "-j", job).strip().split("|")
    return start, end


def submit(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert pipelines.main(args) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    return re.findall(r"\d+", out.split("submitted:")[1]) if "submitted:" in out else []


def test_smoke_pipeline_runs_stage_after_stage_then_resubmission_skips_it(
        slurm: SlurmCluster, mlflow_server: MlflowServer, synth_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two stages chained with afterok; in MLflow the pipeline's parent run is ended by the last stage's job."""
    from mlflow.tracking import MlflowClient

    experiment = f"slurm-{tmp_path.name}"
    args = [str(SMOKE), "--launcher=slurm", "--gpus-per-node=0", "--time=00:05:00", f"--storage={tmp_path}/runs",
            f"--log-dir={tmp_path}/logs", *tiny(synth_dir), "--set=pretrain:schedule.epochs=1",
            "--set=finetune:data.input_size=48", "--set=finetune:run.max_steps=2", "--set=finetune:optimizer.lr=1e-6",
            "--set=run.trackers=[mlflow]", f"--set=run.tracking_uri={mlflow_server.uri}", f"--set=run.experiment={experiment}"]
    first, second = submit(args, capsys)
    assert f"Dependency=afterok:{first}" in slurm.run("scontrol", "show", "job", second)

    assert wait_done(first) == "COMPLETED" and wait_done(second) == "COMPLETED"
    assert sacct_times(slurm, second)[0] >= sacct_times(slurm, first)[1]  # started only after the first ended
    runs = tmp_path / "runs"
    pretrained, tuned = load_file(runs / "smoke-pretrain" / "model.safetensors"), load_file(runs / "smoke-finetune" / "model.safetensors")
    conv = "stages.2.blocks.0.token_mixer.dwconv_hw.weight"
    torch.testing.assert_close(tuned[conv], pretrained[conv], atol=1e-4, rtol=0)  # initialised from stage 1
    assert json.loads((runs / "smoke-finetune" / "config.json").read_text())["data"]["input_size"] == 48
    client = MlflowClient(mlflow_server.uri)
    tracked = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in tracked if r.data.tags.get("kind") == "pipeline"]
    assert parent.info.status == "FINISHED"  # ended by the finetune job, not left RUNNING
    children = {r.info.run_name: r for r in tracked if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["smoke-finetune", "smoke-pretrain"] and len(tracked) == 3
    assert all(r.info.status == "FINISHED" and r.data.tags["launcher"] == "slurm" for r in children.values())

    assert pipelines.main([*args[:1], f"--storage={tmp_path}/runs", "--status"]) == 0
    status = capsys.readouterr().out
    assert re.search(rf"pretrain\s+complete\s+slurm\s+{first}\s+0\s+10", status), status
    assert re.search(rf"finetune\s+complete\s+slurm\s+{second}\s+0\s+2", status), status

    jobs_before = slurm.run("sacct", "-n", "-X", "-o", "JobID", "-S", "now-1hour")
    assert submit(args, capsys) == []  # both stages complete: nothing submitted
    assert slurm.run("sacct", "-n", "-X", "-o", "JobID", "-S", "now-1hour") == jobs_before


def test_ade20k_smoke_pipeline_segments_after_pretraining(
        slurm: SlurmCluster, synth_dir: Path, seg_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(ROOT / "recipes" / "pipelines" / "smoke_ade20k.yaml"), "--launcher=slurm", "--gpus-per-node=0",
            "--time=00:05:00", f"--storage={tmp_path}/runs", f"--log-dir={tmp_path}/logs",
            *(s.replace("--set=", "--set=pretrain:") for s in tiny(synth_dir)), "--set=pretrain:schedule.epochs=1",
            *seg_tiny(seg_dir)]
    first, second = submit(args, capsys)
    assert f"Dependency=afterok:{first}" in slurm.run("scontrol", "show", "job", second)
    assert wait_done(first) == "COMPLETED" and wait_done(second) == "COMPLETED"
    runs = tmp_path / "runs"
    assert_backbone_from(runs / "smoke-ade20k-upernet", runs / "smoke-ade20k-pretrain")
    assert pipelines.main([*args[:1], f"--storage={tmp_path}/runs", "--status"]) == 0
    assert re.search(rf"upernet\s+complete\s+slurm\s+{second}\s+\S+\s+4\s+mIoU=", capsys.readouterr().out)


def one_stage_job(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], epochs: int) -> tuple[str, Path, list[str]]:
    """A one-stage pipeline of the smoke recipe (checkpoints every 5 steps) submitted to Slurm; waits for its
    first checkpoint. Returns the job id, its run folder and its overrides."""
    sets = [*tiny(synth_dir), f"--set=schedule.epochs={epochs}", "--set=run.checkpoint_every_steps=5"]
    # 10 minutes: Slurm's USR2 comes 2 minutes before the limit, which a busy machine's 200 steps reached at 5
    (job,) = submit([str(one_stage(tmp_path)), "--gpus-per-node=0", "--time=00:10:00", f"--storage={tmp_path}/runs",
                     f"--log-dir={tmp_path}/logs", *sets], capsys)
    run = tmp_path / "runs" / "one-pretrain"
    poll(lambda: steps_of(run), 120, "the first checkpoint")
    return job, run, [s.removeprefix("--set=") for s in sets]


def one_stage(tmp_path: Path) -> Path:
    path = tmp_path / "one.yaml"
    path.write_text(f"name: one\nstages:\n  - {{name: pretrain, recipe: {ROOT}/recipes/smoke.yaml}}\n")
    return path


def assert_bitwise_uninterrupted(run: Path, sets: list[str], tmp_path: Path) -> None:
    reference = pipeline_file.load(one_stage(tmp_path), sets, storage_url=f"{tmp_path}/reference")
    pretrain.train(pipeline_file.stage_recipe(reference, reference.stages[0]))
    a, b = load_file(run / "model.safetensors"), load_file(tmp_path / "reference" / "one-pretrain" / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_slurm_preemption_sigterm_checkpoints_requeues_and_ends_like_an_uninterrupted_run(
        slurm: SlurmCluster, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PreemptMode=REQUEUE: a job in a higher-priority partition preempts the stage, which gets SIGTERM,
    checkpoints the next step within GraceTime and is requeued. 140 steps, so that the preemption
    (decided within the scheduler's 5 s interval) finds it still running."""
    job, run, sets = one_stage_job(synth_dir, tmp_path, capsys, epochs=14)
    cpus = slurm.run("sinfo", "-h", "-o", "%c").split()[0]
    urgent = slurm.run("sbatch", "--parsable", "--partition=urgent", f"--cpus-per-task={cpus}", "--wrap=sleep 5",
                       f"--output={tmp_path}/urgent.out").strip()

    assert wait_done(urgent, timeout=300) == "COMPLETED"
    assert wait_done(job, timeout=300) == "COMPLETED"
    log = (tmp_path / "logs" / job / f"{job}_0_log.err").read_text()
    stopped = int(re.search(r"stopped at step (\d+) on SIGTERM", log).group(1))
    assert [r["step"] for r in RunDir(str(run)).records() if r["kind"] == "resume"] == [stopped] and 0 < stopped < 140
    assert_bitwise_uninterrupted(run, sets, tmp_path)


def test_a_stall_past_max_stall_restarts_ends_the_job_as_stalled_instead_of_requeueing(
        slurm: SlurmCluster, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hang that would come back on every attempt: with run.max_stall_restarts=0 the first stall ends the job
    (FAILED, never requeued), the run marked stalled, one line saying why."""
    marker = tmp_path / "stalled"
    monkeypatch.setenv(faults.ENV, f"stall:2:0:{marker}")  # sbatch exports it to this job only
    sets = [*tiny(synth_dir), "--set=schedule.epochs=1", "--set=run.stall_timeout_s=3", "--set=run.max_stall_restarts=0"]
    (job,) = submit([str(one_stage(tmp_path)), "--gpus-per-node=0", "--time=00:05:00", f"--storage={tmp_path}/runs",
                     f"--log-dir={tmp_path}/logs", *sets], capsys)
    assert wait_done(job, timeout=200) == "FAILED"
    assert re.search(r"Restarts=0\b", slurm.run("scontrol", "show", "job", job))
    log = (tmp_path / "logs" / job / f"{job}_0_log.err").read_text()
    assert f"Slurm job {job} not requeued: 0 stall requeue(s) already, run.max_stall_restarts=0" in log
    status = RunDir(str(tmp_path / "runs" / "one-pretrain")).status()
    assert status["state"] == "stalled" and "not requeued" in status["error"]


def test_bad_options_and_a_dead_controller_fail_before_submitting(
        slurm: SlurmCluster, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = [str(SMOKE), f"--storage={tmp_path}/runs", f"--log-dir={tmp_path}/logs", *tiny(synth_dir)]
    jobs_before = slurm.run("sacct", "-n", "-X", "-o", "JobID", "-S", "now-1hour")
    assert pipelines.main([*base, "--partition=nosuch"]) == 2
    assert "invalid partition" in capsys.readouterr().err.lower()
    assert pipelines.main([*base, "--time=1:2:3:4"]) == 2
    assert "slurm time '1:2:3:4'" in capsys.readouterr().err
    dead = tmp_path / "dead.conf"
    dead.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=9", slurm.conf.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    assert pipelines.main(base) == 2
    assert "Slurm controller is not reachable" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    assert slurm.run("sacct", "-n", "-X", "-o", "JobID", "-S", "now-1hour") == jobs_before
    assert not (tmp_path / "runs").exists()


def test_status_without_accounting_falls_back_to_squeue_and_says_so(
        slurm_without_accounting: SlurmCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = slurm_without_accounting
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    assert "accounting storage is disabled" in subprocess.run(["sacct", "-n"], env=slurm.env, capture_output=True,
                                                             text=True).stderr.lower()
    job = slurm.run("sbatch", "--parsable", "--wrap=sleep 300", f"--output={tmp_path}/sleep.out").strip()
    try:
        poll(lambda: job_states([job])[0].get(job) == "RUNNING", 60, f"job {job} running in squeue")
        p = pipeline_file.load(SMOKE, storage_url=f"{tmp_path}/runs")
        pipeline_file.record(p, p.stages[0], "slurm", job)
        assert pipelines.main([str(SMOKE), f"--storage={tmp_path}/runs", "--status"]) == 0
        out = capsys.readouterr().out
        assert re.search(rf"pretrain\s+running\s+slurm\s+{job}\s", out), out
        assert "no accounting: sacct is not available" in out
    finally:
        slurm.run("scancel", job, check=False)
